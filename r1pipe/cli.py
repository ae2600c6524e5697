"""The `r1pipe` command: one subcommand per stage, plus `run`, `plan` and `rewards`.

    r1pipe sft recipes/demo/sft.yaml train.lr=1e-4      # run one stage; key=value overrides the YAML
    r1pipe run recipes/demo/pipeline.yaml               # run a multi-stage pipeline
    r1pipe plan recipes/deepseek-v3/grpo.yaml           # sizes, memory, tokens per step; runs nothing
    r1pipe rewards list                                 # reward plug-ins and their options
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import typing

from r1pipe import __version__, pipeline
from r1pipe.config import RecipeError, get_stage, stage_summaries
from r1pipe.runner import load_recipe, run_stage

TOOLS = {
    "run": "run a pipeline file (several stages wired together), resuming where it stopped",
    "plan": "show what a recipe builds and needs (parameters, memory per device, tokens per step)",
    "rewards": "list the reward plug-ins and their options",
}


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "|".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        name = getattr(origin, "__name__", str(origin)).replace("UnionType", "Union")
        return f"{name}[{args}]" if name not in ("Union",) else " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def describe_schema(cls, indent: int = 2) -> str:
    """Every option of a config class, nested sections indented, with type, default and purpose."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from r1pipe.config import _section_class

    lines = []
    for name, field in cls.model_fields.items():
        sub = _section_class(field.annotation)
        pad = " " * indent
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = f"default {field.default_factory()!r}"
        elif field.default is PydanticUndefined:
            default = "required"
        else:
            value = field.default
            default = f"default {value.model_dump() if isinstance(value, BaseModel) else value!r}"
        doc = field.description or ""
        if sub is not None and sub is not cls:
            lines.append(f"{pad}{name}:  ({_type_name(field.annotation)}; {default}) {doc}".rstrip())
            lines.append(describe_schema(sub, indent + 4))
        else:
            head = f"{pad}{name}  ({_type_name(field.annotation)}; {default})"
            wrapped = textwrap.wrap(doc, width=100, initial_indent=pad + "    ", subsequent_indent=pad + "    ")
            lines.append("\n".join([head, *wrapped]))
    return "\n".join(lines)


def _stage_parser(sub, name: str, summary: str, with_schema: bool):
    epilog = None
    if with_schema:
        config_cls, run_fn = get_stage(name)
        module_doc = (sys.modules[run_fn.__module__].__doc__ or "").strip()
        epilog = (module_doc + "\n\n" if module_doc else "") + "recipe options (YAML keys; override with key.sub=value):\n"
        epilog += describe_schema(config_cls)
    parser = sub.add_parser(
        name,
        help=summary,
        description=f"r1pipe {name}: {summary}.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help=f"YAML recipe for the {name} stage (recipes/<model-or-task>/{name}.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. train.lr=1e-5")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory instead of resuming it")
    return parser


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r1pipe",
        description="The DeepSeek-R1 recipe as software: pretrain, cold-start SFT, GRPO, distillation, eval, export.",
        epilog="Run `r1pipe <command> --help` for a command's options (stage commands list every recipe key).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"r1pipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    wanted = argv[0] if argv else None
    for name, summary in stage_summaries().items():
        _stage_parser(sub, name, summary, with_schema=(name == wanted and any(a in ("-h", "--help") for a in argv)))

    run = sub.add_parser("run", help=TOOLS["run"], description="r1pipe run: " + TOOLS["run"] + ".",
                         epilog=pipeline.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("pipeline", help="pipeline YAML (recipes/<x>/pipeline.yaml), or a single stage recipe")
    run.add_argument("overrides", nargs="*", metavar="step.key=value",
                     help="override a step's recipe key, e.g. cold_start.train.lr=1e-5")
    run.add_argument("--overwrite", action="store_true", help="replace existing run directories instead of resuming")
    run.add_argument("--only", action="append", metavar="STEP",
                     help="run only this step (repeatable); earlier steps must have finished")

    plan = sub.add_parser("plan", help=TOOLS["plan"], description="r1pipe plan: " + TOOLS["plan"] + ".")
    plan.add_argument("recipe", help="stage recipe or pipeline YAML")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys")
    plan.add_argument("--gpus", type=int, default=None, help="devices to plan for (default: the recipe's: a colocated vLLM's tensor_parallel_size, else 1)")

    rewards = sub.add_parser("rewards", help=TOOLS["rewards"], description="r1pipe rewards: " + TOOLS["rewards"] + ".")
    rewards.add_argument("action", choices=["list"], help="list: every registered reward with its options")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        if args.command is None:
            build_parser([]).print_help()
            return 0
        if args.command in stage_summaries():
            run_stage(load_recipe(args.recipe, args.overrides, stage=args.command), overwrite=args.overwrite)
        elif args.command == "run":
            if pipeline.is_pipeline(args.pipeline):
                pipeline.run_pipeline(args.pipeline, args.overrides, overwrite=args.overwrite, only=args.only)
            else:
                run_stage(load_recipe(args.pipeline, args.overrides), overwrite=args.overwrite)
        elif args.command == "plan":
            from r1pipe.plan import print_plan

            print_plan(args.recipe, args.overrides, gpus=args.gpus)
        elif args.command == "rewards":
            from r1pipe.rewards import describe_rewards

            _print_rewards(describe_rewards())
    except RecipeError as err:
        print(f"r1pipe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("r1pipe: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Under torchrun, close the process group the trainer opened before the interpreter exits, as torch asks
    (NCCL warns of leaked resources otherwise) rather than leaving it to interpreter teardown."""
    distributed = sys.modules.get("torch.distributed")  # only if a stage imported torch
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def _print_rewards(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="r1pipe rewards")
    for column in ("name", "what it scores", "options (default)"):
        table.add_column(column, overflow="fold")
    for name, doc, options in rows:
        opts = ", ".join(f"{k}={v!r}" for k, v in (options or {}).items()) or "-"
        table.add_row(name, doc, opts)
    Console(width=140).print(table)


if __name__ == "__main__":
    sys.exit(main())
