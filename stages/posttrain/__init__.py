"""Post-training stages: `stages.posttrain.sft` and `stages.posttrain.dpo`.

Each submodule exposes `Config`, `INPUTS`, `OUTPUT_KIND` and `run(ctx)`. They share the
chat tokenisation with the assistant mask (`chat`), the Ray Train worker loop with its
resumable train state (`loop`, `runtime`) and the stage-process plumbing (`common`).
"""
