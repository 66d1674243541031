"""Pipeline stages. Each subpackage exposes `Config` (a dataclass), `INPUTS` (input name ->
artifact kind), `OUTPUT_KIND` and `run(ctx: StageContext) -> StageResult`. Stages import
`ernie`, `pipeline.contract` and `pipeline.formats` only, never each other."""
