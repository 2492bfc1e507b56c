"""Command line: evaluate a judge on a labelled table.

python -m refusal_lab.judge eval FILE.csv --text-column response --label-column label
    [--judge rule|keyword|llm|classifier] [--family auto|llama2|mistral|organism|generic]
    [--prefixes "I cannot,I'm sorry"] [--prompt-column prompt] [--model HUB_ID_OR_PATH] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from refusal_lab.errors import ConfigError
from refusal_lab.judge.config import ClassifierJudgeConfig, JudgeConfig, JudgeName, LlmJudgeConfig
from refusal_lab.judge.core import keyword_codes
from refusal_lab.judge.evaluate import column, evaluate, format_report, read_table
from refusal_lab.judge.rules import FAMILY_CUES, RuleJudge, family_of

log = logging.getLogger("refusal_lab.judge")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m refusal_lab.judge", description="Evaluate a refusal judge on a labelled table."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="accuracy, per-class P/R/F1 and confusion matrix against human labels")
    ev.add_argument("file", type=Path, help=".csv, .tsv, .json or .jsonl table")
    ev.add_argument("--text-column", required=True, help="column holding the model's response")
    ev.add_argument("--label-column", required=True, help="column holding the human label")
    ev.add_argument(
        "--prompt-column", default=None, help="column holding the prompt (llm/classifier; rule: its request check)"
    )
    ev.add_argument("--judge", default="rule", choices=[j.value for j in JudgeName if j != JudgeName.score])
    ev.add_argument("--family", default="generic", help=f"rule judge phrasings: {', '.join(sorted(FAMILY_CUES))}")
    ev.add_argument("--model-name", default=None, help="derive --family from a model name (e.g. a hub id)")
    ev.add_argument("--prefixes", default="", help="comma-separated refusal prefixes (keyword; extra rule openers)")
    ev.add_argument("--model", default=None, help="llm/classifier judge: hub id or local path")
    ev.add_argument("--local-files-only", action="store_true")
    ev.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        rows = read_table(args.file)
        texts = [str(t) for t in column(rows, args.text_column, args.file)]
        truth = column(rows, args.label_column, args.file)
        prompts = (
            [str(p) for p in column(rows, args.prompt_column, args.file)] if args.prompt_column else [""] * len(rows)
        )
        prefixes = [p.strip() for p in args.prefixes.split(",") if p.strip()]
        judge = JudgeName(args.judge)
        if judge == JudgeName.rule:
            family = family_of(args.model_name) if args.model_name else args.family
            rule = RuleJudge(family=family, extra_prefixes=tuple(prefixes))
            codes = rule.judge_many(texts, prompts if args.prompt_column else None)
        elif judge == JudgeName.keyword:
            if not prefixes:
                raise ConfigError("--prefixes: the keyword judge needs at least one prefix")
            codes = keyword_codes(texts, prefixes)
        else:
            if not args.model:
                raise ConfigError(f"--model: the {judge.value} judge needs a model (hub id or local path)")
            from refusal_lab.judge.models import run_model_judge

            cfg = JudgeConfig(
                judges=[judge],
                llm=LlmJudgeConfig(model=args.model, local_files_only=args.local_files_only),
                classifier=ClassifierJudgeConfig(model=args.model, local_files_only=args.local_files_only),
            )
            with tempfile.TemporaryDirectory() as tmp:
                codes, _ = run_model_judge(judge, cfg, prompts, texts, Path(tmp))
        report = evaluate(truth, np.asarray(codes))
    except (ConfigError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(format_report(report, judge.value))
    if args.json is not None:
        args.json.write_text(json.dumps({"judge": judge.value, "file": str(args.file), **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
