"""The judge stage: judge an existing store's responses with every configured judge, never touching the store.

Reads: the store's sample table (prompt, label, category, response, refusal_score).
Writes, per judge: `<artifacts>/judge/<store fingerprint>/<judgement fingerprint>/`
    codes.npy        int8 [n_samples], store sample order: 0 full_compliance, 1 full_refusal, 2 partial_refusal
    judgement.json   {"judge", "settings", "fingerprint", "store_fingerprint", "n", "complete", ...}
                     (score: the threshold and its calibration; llm/classifier: their model and label scores)
and, beside summary.json, `judge_disagreements.csv`: every response on which two judges' binary views differ.
summary.json["judges"] holds the agreement of every pair (refusal_lab.judge.metrics.judges_agreement), the
score threshold's calibration, and each judge's class shares by label.

A judgement folder is written last by `judgement.json` with complete=true: a rerun reuses it; an llm/classifier
judge killed midway resumes from its progress file (refusal_lab.judge.models).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refusal_lab.fingerprint import fingerprint, write_json_atomic
from refusal_lab.judge.calibrate import calibrate_score
from refusal_lab.judge.config import JudgeConfig, JudgeName
from refusal_lab.judge.core import keyword_codes, rule_judge_for, rule_settings, score_codes
from refusal_lab.judge.labels import VERDICTS, binary_view
from refusal_lab.judge.metrics import judges_agreement
from refusal_lab.store import ActivationStore, read_json

log = logging.getLogger(__name__)

ALGORITHM_VERSION = 1
"""Bump whenever the judge stage's output changes for the same settings (layout, label scoring, calibration)."""

JUDGEMENT = "judgement.json"
CODES_FILE = "codes.npy"
DISAGREEMENTS = "judge_disagreements.csv"

THREE_CLASS = {
    JudgeName.keyword: False,
    JudgeName.rule: True,
    JudgeName.score: False,
    JudgeName.llm: True,
    JudgeName.classifier: True,
}
"""Whether a judge can say partial_refusal (3x3 matrices are reported only between three-class judges)."""


def judge_root(artifacts: Path, store_fp: str) -> Path:
    return artifacts / "judge" / store_fp


def judge_settings(name: JudgeName, cfg: JudgeConfig, model_name: str, refusal_prefixes: Sequence[str]) -> Any:
    """Exactly what decides a judge's classes on a given store (batch sizes and devices do not)."""
    from refusal_lab.judge.models import LLM_VERSION, model_settings

    if name == JudgeName.keyword:
        return {"prefixes": list(refusal_prefixes)}
    if name == JudgeName.rule:
        return rule_settings(cfg, model_name, refusal_prefixes)
    if name == JudgeName.score:
        reference = cfg.calibrate_against
        return {
            "threshold": cfg.score_threshold,
            "partial_is_refused": cfg.partial_is_refused,
            "calibrate_against": None
            if cfg.score_threshold is not None
            else {"judge": reference.value, "settings": judge_settings(reference, cfg, model_name, refusal_prefixes)},
        }
    if name == JudgeName.llm:
        settings = {**model_settings(cfg.llm), "llm_version": LLM_VERSION}
        if cfg.llm.gguf_file is not None:  # the file's own content, so a new package release is a new judgement
            from refusal_lab.gguf_source import gguf_fingerprint
            from refusal_lab.judge.models import llm_source

            folder, kwargs = llm_source(cfg.llm)
            settings["gguf"] = gguf_fingerprint(Path(folder) / kwargs["gguf_file"])
        return settings
    return model_settings(cfg.classifier)


def judgement_fingerprint(
    store_fp: str, name: JudgeName | str, cfg: JudgeConfig, model_name: str, refusal_prefixes: Sequence[str]
) -> str:
    """Names one judge's judgement folder: the store, the judge, its settings and ALGORITHM_VERSION."""
    judge = JudgeName(name)
    settings = judge_settings(judge, cfg, model_name, refusal_prefixes)
    return fingerprint({"store": store_fp, "judge": judge.value, "settings": settings, "algorithm": ALGORITHM_VERSION})


def load_judgement(folder: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(codes, judgement.json) of a complete judgement folder, else None."""
    meta = read_json(folder / JUDGEMENT)
    if meta is None or not meta.get("complete"):
        return None
    return np.load(folder / CODES_FILE), meta


def _commit(folder: Path, codes: np.ndarray, meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CODES_FILE + ".tmp.npy")
    np.save(tmp, codes.astype(np.int8))
    tmp.replace(folder / CODES_FILE)
    write_json_atomic(folder / JUDGEMENT, {**meta, "complete": True})  # the commit marker, written last


def judges_to_run(judges: Sequence[JudgeName], cfg: JudgeConfig) -> list[JudgeName]:
    """Score last, and its calibration reference before it even when not listed."""
    names = [j for j in judges if j != JudgeName.score]
    if JudgeName.score in judges:
        if cfg.score_threshold is None and cfg.calibrate_against not in names:
            names.append(cfg.calibrate_against)
        names.append(JudgeName.score)
    return names


def run_judges(
    store_path: Path,
    artifacts: Path,
    cfg: JudgeConfig,
    model_name: str,
    refusal_prefixes: Sequence[str],
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Judge every response of the store with `cfg.judges`; returns summary.json["judges"]."""
    store = ActivationStore.open(store_path)
    samples = store.samples()
    responses = [str(r) for r in samples["response"]]
    prompts = [str(p) for p in samples["prompt"]]
    labels = [str(x) for x in samples["label"]]
    scores = np.asarray(samples["refusal_score"], dtype=np.float64)
    root = judge_root(artifacts, store.fingerprint)
    codes: dict[str, np.ndarray] = {}
    entries: dict[str, Any] = {}
    calibration: dict[str, Any] | None = None
    for name in judges_to_run(cfg.judges, cfg):
        fp = judgement_fingerprint(store.fingerprint, name, cfg, model_name, refusal_prefixes)
        folder = root / fp
        found = load_judgement(folder)
        if found is not None:
            judged, meta = found
            log.info("judge %s: reusing %s", name.value, folder)
        else:
            meta = {
                "judge": name.value,
                "settings": judge_settings(name, cfg, model_name, refusal_prefixes),
                "fingerprint": fp,
                "store_fingerprint": store.fingerprint,
                "n": len(responses),
            }
            if name == JudgeName.keyword:
                judged = keyword_codes(responses, refusal_prefixes)
            elif name == JudgeName.rule:
                judged = rule_judge_for(cfg, model_name, refusal_prefixes).judge_many(responses, prompts)
            elif name == JudgeName.score:
                threshold = cfg.score_threshold
                if threshold is None:
                    reference = binary_view(codes[cfg.calibrate_against.value], cfg.partial_is_refused)
                    meta["calibration"] = calibrate_score(scores, reference, prompts, cfg.calibrate_against.value)
                    threshold = meta["calibration"]["threshold"]
                meta["threshold"] = threshold
                judged = score_codes(scores, threshold)
            else:
                from refusal_lab.judge.models import run_model_judge

                judged, extra = run_model_judge(name, cfg, prompts, responses, folder)
                meta.update(extra)
            _commit(folder, judged, meta)
            log.info("judge %s: %d responses judged into %s", name.value, len(judged), folder)
        codes[name.value] = judged
        if name == JudgeName.score:
            calibration = meta.get("calibration")
            entries_extra = {"threshold": meta["threshold"]}
        else:
            entries_extra = {}
        entries[name.value] = {
            "fingerprint": meta["fingerprint"],
            "path": str(folder),
            "three_class": THREE_CLASS[name],
            **entries_extra,
            **class_shares(judged, labels, cfg.partial_is_refused),
        }
    report: dict[str, Any] = {
        "store_fingerprint": store.fingerprint,
        "per_judge": entries,
        **judges_agreement(codes, {k: THREE_CLASS[JudgeName(k)] for k in codes}, labels, cfg.partial_is_refused),
    }
    if calibration is not None:
        report["score_calibration"] = calibration
    if run_dir is not None:
        path = run_dir / DISAGREEMENTS
        report["disagreements"] = {"csv": str(path), "n": write_disagreements(path, samples, codes, cfg)}
    return report


def class_shares(codes: np.ndarray, labels: Sequence[str], partial_is_refused: bool) -> dict[str, Any]:
    """Refusal rate (binary view) and share of each class, overall and by prompt label."""
    label_arr = np.asarray(labels)

    def shares(mask: np.ndarray) -> dict[str, Any]:
        sub = codes[mask]
        n = int(mask.sum())
        return {
            "n": n,
            "refusal_rate": float(binary_view(sub, partial_is_refused).mean()) if n else None,
            **{v.value: float(np.mean(sub == k)) if n else None for k, v in enumerate(VERDICTS)},
        }

    return {
        "overall": shares(np.ones(len(label_arr), dtype=bool)),
        "by_label": {lab: shares(label_arr == lab) for lab in sorted(set(labels))},
    }


def write_disagreements(path: Path, samples: dict[str, Any], codes: dict[str, np.ndarray], cfg: JudgeConfig) -> int:
    """CSV of the responses where any two judges differ (binary view, or class where both give three)."""
    names = list(codes)
    binary = {k: binary_view(v, cfg.partial_is_refused) for k, v in codes.items()}
    differs = np.zeros(len(samples["response"]), dtype=bool)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            differs |= binary[a] != binary[b]
            if THREE_CLASS[JudgeName(a)] and THREE_CLASS[JudgeName(b)]:
                differs |= codes[a] != codes[b]
    rows = np.flatnonzero(differs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample_id", "label", "category", *names, "refusal_score", "prompt", "response"])
        for i in rows:
            writer.writerow(
                [
                    int(samples["sample_id"][i]),
                    samples["label"][i],
                    samples["category"][i],
                    *(VERDICTS[int(codes[k][i])].value for k in names),
                    float(samples["refusal_score"][i]),
                    samples["prompt"][i],
                    samples["response"][i],
                ]
            )
    tmp.replace(path)
    return len(rows)


def refused_labels(
    store_path: Path,
    artifacts_dir: Path,
    refused_by: str,
    cfg: JudgeConfig | None = None,
) -> np.ndarray:
    """bool [n_samples] in store sample order: which responses `refused_by` judged refused (binary view).

    keyword / rule are recomputed from the store's responses when no judgement exists (they are cheap and need
    only the store's own config); score, llm and classifier need a committed judgement folder from the judge
    stage. With `cfg` the folder is found by fingerprint; without, the one folder of that judge for this store
    is used (an error names them when there are several).
    """
    from refusal_lab.errors import ConfigError

    name = JudgeName(refused_by)
    store = ActivationStore.open(store_path)
    run_cfg = store.attrs.get("config", {})
    model_name = str(run_cfg.get("model", {}).get("name", "organism"))
    prefixes = list(run_cfg.get("model", {}).get("refusal_prefixes", []))
    judge_cfg = cfg if cfg is not None else JudgeConfig(judges=[JudgeName.rule])
    root = judge_root(Path(artifacts_dir), store.fingerprint)
    if cfg is not None:
        found = load_judgement(root / judgement_fingerprint(store.fingerprint, name, cfg, model_name, prefixes))
        candidates = [found] if found is not None else []
    else:
        candidates = [
            found
            for folder in sorted(root.glob("*"))
            if (found := load_judgement(folder)) is not None and found[1].get("judge") == name.value
        ]
    if len(candidates) == 1:
        return binary_view(candidates[0][0], judge_cfg.partial_is_refused)
    if len(candidates) > 1:
        raise ConfigError(
            f"circuits.refused_by: {len(candidates)} {name.value} judgements of store {store.fingerprint} in {root} "
            f"({[c[1]['fingerprint'] for c in candidates]}); pass the judge config to choose one"
        )
    samples = store.samples()
    responses = [str(r) for r in samples["response"]]
    if name == JudgeName.keyword:
        return binary_view(keyword_codes(responses, prefixes))
    if name == JudgeName.rule:
        prompts = [str(p) for p in samples["prompt"]]
        return binary_view(
            rule_judge_for(judge_cfg, model_name, prefixes).judge_many(responses, prompts),
            judge_cfg.partial_is_refused,
        )
    raise ConfigError(
        f"circuits.refused_by: no {name.value} judgement of store {store.fingerprint} in {root}; run the judge "
        f"stage first (stages=[judge] judge.judges=[{name.value}])"
    )
