"""The compression methods, one chapter each: every module is named after the method it registers
(``pruned-weights`` → `pruned_weights`) and holds one frozen config dataclass and one ``apply``
(`compression.registry` explains the seam; `compression.registry.METHOD_MODULES` lists them).

- `pruned_weights` — ``pruned-weights``: iterative magnitude pruning, lottery-ticket rewinds.
- `pruned_neurons` — ``pruned-neurons``: whole channels removed (torch-pruning).
- `distilled` — ``distilled``: knowledge distillation into a smaller student; also home of the
  distillation loss (`distilled.kd_loss`) and its fixed-teacher training loss
  (`distilled.kd_training_loss`) that other methods reuse.
- `int8` — ``int8``: post-training static int8 quantization with ONNX Runtime (QDQ).
- `clustered` — ``clustered``: per-layer k-means weight sharing and Huffman coding.
- `binary` — ``binary``: BinaryConnect ±α weights.
- `low_rank` — ``low-rank``: truncated-SVD factorisation of convs and linears.
- `depthwise` — ``depthwise``: depthwise separable convs, trained by distillation.
- `early_exit` — ``early-exit``: a classifier after every stage, served stage by stage (its
  exit rules live in the torch-free `compression.core.exits`, shared with the server).

The shared machinery (data, models, training, export, profiling, the registry and the builder)
sits beside this package in `compression/`; nothing here is imported by the server.
"""
