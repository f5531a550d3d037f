"""The quality benchmark of the default model's factored variants (`factorkv eval`).

Variants (checkpoints under ``<work>/models/``, built on first use with the converter):
  original      the prepared default model (SmolLM2-135M-Instruct, float32)
  init-rR       `factorkv convert SRC DST --key-rank R`               (training-free init)
  cal-rR        `factorkv convert SRC DST --key-rank R --calibrate`   (current recipe)
  served-rR     the build `factorkv serve --variant thin-rR` serves: the shipped artifact
                (model_patches.conversion.default_variants, its longer recipe) swapped into the original
  merge-kvN     `factorkv convert SRC DST --kv-heads N`               (KV head merging, GQA)
  merge-kvN-real                 ... `--merge-keys real` (non-RoPE-commuting key merge)
  merge-kvN-rec                  ... `--recover` (merged attention trained against the source)
  merge-kvN-recS                 ... `--recover --e2e-steps S` (then S end-to-end KL steps)
  merge-kvN[-real][-rec[S]]-rR, ...-cal-rR    merged, then factored (and calibrated)
  NAME=PATH     any other checkpoint, factored or not (``--variant``)

Metrics (model_patches.evaluation.tasks on engine.torch_model, plain batched torch, float32),
cached per variant in ``<work>/results/<variant>.json`` keyed by the metric's settings and
the checkpoint's fingerprint (model_patches.evaluation.results_cache), so a re-run only
computes what is missing:
  * perplexity on each held-out text (``--texts``, default both: the held-out Wikipedia
    split, and news, a kind of text calibration never sees; model_patches.text_sets) at
    each context (non-overlapping windows);
  * passkey accuracy at each length (greedy, exact match of the 5 digits);
  * greedy answers to 5 chat prompts, and chat fidelity on 48 prompts of 8 kinds against
    the original's greedy answers (answer NLL, top-1 agreement, identical answers, loops;
    model_patches.evaluation.chat_fidelity);
  * for one variant, the perplexity recomputed through the vLLM engine (prompt logprobs of
    the same windows) and compared with the torch number.
The report (markdown) is written to ``--out`` (docs/results/quality.md), with a KV bytes
per token vs perplexity table and its plot (``<report>-pareto.png`` next to the report, ``quality-pareto.png`` for quality.md).

Modules: ``variants`` (the variant names and how each checkpoint is built), ``run`` (the
metrics of each variant, with its result cache, and the whole benchmark), ``report`` (the
markdown tables and the Pareto plot), ``report_chat`` (its chat sections).
"""
