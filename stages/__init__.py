"""Pipeline stages. Each subpackage exposes `Config` (a dataclass), `INPUTS` (input name ->
artifact kind), `OUTPUT_KIND` and `run(ctx: StageContext) -> StageResult`. Stages import
`ernie`, `pipeline.contract`, `pipeline.formats`, `pipeline.shards` and the shared
`stages.training` library only, never each other."""
