"""The stages, one module each: its config class and `run(cfg, run_dir)`, registered with
`r1pipe.config.register_stage(name, Config, summary=...)`. Importing this package registers them all;
a new stage is a new module here, added to the import below."""

# In the order of the R1 pipeline: the registry keeps it, and `r1pipe --help` lists the stages so.
from r1pipe.stages import pretrain, sft, grpo, distill, eval, export, report  # noqa: F401, I001
