"""Test support shared by the test files and the benchmark scripts.

- :mod:`support.reference`: the independent reference (the original model
  with exactly the removed consumer weight columns zeroed by hand) and the
  removal set a request implies, from the trace-level channel groups;
- :mod:`support.widths`: every width attribute of a (pruned) model agrees
  with its tensors (DESIGN.md, invariant 8): conv/linear channels and groups,
  norms, embeddings, ``nn.MultiheadAttention``'s heads, Subselect layers;
- :mod:`support.compare`: the one output comparison (``compare``,
  ``assert_close``, ``rel_error``) and ``n_params``;
- :mod:`support.unchanged`: the one "model exactly as before" helper
  (``snapshot``, ``assert_unchanged``, ``raises_unchanged``);
- :mod:`support.randomize`: deterministic random values for every norm's
  affine parameters and running statistics, layer scales and biases, so that
  a channel sliced in the wrong place or order changes the output.

``tests/`` is on ``sys.path`` (like ``export_props`` and ``randnet``): import
as ``from support.reference import zeroed_reference``.
"""
