"""lm-eval's downstream tasks over local copies of their evaluation splits (no dataset hub needed).

Each task keeps lm-eval's own definition (prompt, choices, target, metrics: the task's YAML in the installed
lm_eval package); only its dataset is replaced by records read from a local directory laid out as
`../shared/data/tasks` is, reshaped to the fields the hub copy has. Zero-shot: no training split is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable


class TaskDataError(ValueError):
    """A task's local files are missing or do not parse."""


def _jsonl(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise TaskDataError(f"missing task file {path}") from None
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path} is not JSON lines: {e}") from None


def _labels(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        raise TaskDataError(f"missing task file {path}") from None


def _piqa(root: Path) -> list[dict]:
    docs, labels = _jsonl(root / "piqa/valid.jsonl"), _labels(root / "piqa/valid-labels.lst")
    if len(docs) != len(labels):
        raise TaskDataError(f"piqa: {len(docs)} questions but {len(labels)} labels")
    return [{**d, "label": int(label)} for d, label in zip(docs, labels)]


def _arc(name: str) -> Callable[[Path], list[dict]]:
    def load(root: Path) -> list[dict]:
        docs = _jsonl(root / f"arc_{name.lower()}/ARC-{name}-Test.jsonl")
        return [
            {
                "id": d["id"],
                "question": d["question"]["stem"],
                "answerKey": d["answerKey"],
                "choices": {
                    "text": [c["text"] for c in d["question"]["choices"]],
                    "label": [c["label"] for c in d["question"]["choices"]],
                },
            }
            for d in docs
        ]

    return load


def _openbookqa(root: Path) -> list[dict]:
    return [
        {
            "id": d["id"],
            "question_stem": d["question"]["stem"],
            "answerKey": d["answerKey"],
            "choices": {
                "text": [c["text"] for c in d["question"]["choices"]],
                "label": [c["label"] for c in d["question"]["choices"]],
            },
        }
        for d in _jsonl(root / "openbookqa/test.jsonl")
    ]


def _hellaswag(root: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    path = root / "hellaswag/data-00000-of-00001.arrow"
    if not path.exists():
        raise TaskDataError(f"missing task file {path}")
    return ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def _boolq(root: Path) -> list[dict]:
    return [{**d, "label": int(d["label"] in (True, "true", "True", 1))} for d in _jsonl(root / "boolq/val.jsonl")]


def _rte(root: Path) -> list[dict]:
    ids = {"entailment": 0, "not_entailment": 1}
    return [
        {**d, "label": ids[d["label"]] if isinstance(d["label"], str) else int(d["label"])}
        for d in _jsonl(root / "rte/val.jsonl")
    ]


@dataclasses.dataclass(frozen=True)
class LocalTask:
    lm_eval_name: str  # the task in lm-eval's registry whose definition is used
    split: str  # the split lm-eval evaluates ("validation" or "test")
    load: Callable[[Path], list[dict]]  # tasks dir -> records with the hub copy's fields
    source: str  # the files read, relative to the tasks dir
    documents: int  # how many records the split holds


LOCAL_TASKS: dict[str, LocalTask] = {
    "lambada_openai": LocalTask(
        "lambada_openai", "test", lambda r: _jsonl(r / "lambada/lambada_test.jsonl"), "lambada/lambada_test.jsonl", 5153
    ),
    "piqa": LocalTask("piqa", "validation", _piqa, "piqa/valid.jsonl + valid-labels.lst", 1838),
    "hellaswag": LocalTask("hellaswag", "validation", _hellaswag, "hellaswag/*.arrow", 10042),
    "arc_easy": LocalTask("arc_easy", "test", _arc("Easy"), "arc_easy/ARC-Easy-Test.jsonl", 2376),
    "arc_challenge": LocalTask(
        "arc_challenge", "test", _arc("Challenge"), "arc_challenge/ARC-Challenge-Test.jsonl", 1172
    ),
    "openbookqa": LocalTask("openbookqa", "test", _openbookqa, "openbookqa/test.jsonl", 500),
    "winogrande": LocalTask(
        "winogrande", "validation", lambda r: _jsonl(r / "winogrande/dev.jsonl"), "winogrande/dev.jsonl", 1267
    ),
    "copa": LocalTask("copa", "validation", lambda r: _jsonl(r / "copa/val.jsonl"), "copa/val.jsonl", 100),
    "boolq": LocalTask("boolq", "validation", _boolq, "boolq/val.jsonl", 3270),
    "rte": LocalTask("sglue_rte", "validation", _rte, "rte/val.jsonl", 277),
}


def parse_task_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOCAL_TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or text!r}; choose from {', '.join(LOCAL_TASKS)}")
    return names


@functools.cache
def lm_eval_task_manager():
    """lm-eval's index of its own task YAMLs (where each task's prompt and metric config lives), built once per
    process: indexing reads thousands of YAML files (seconds), and every `TaskManager()` does it again."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def build_task(name: str, tasks_dir: str | Path, task_manager=None):
    """An lm-eval `ConfigurableTask` for `name` whose documents come from `tasks_dir`. `task_manager`: lm-eval's
    task index (default: `lm_eval_task_manager()`)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    spec = LOCAL_TASKS[name]
    root = Path(tasks_dir)
    if not root.is_dir():
        raise TaskDataError(f"tasks dir {root} does not exist")
    try:
        records = spec.load(root)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, TaskDataError):
            raise
        raise TaskDataError(f"{name}: a record under {root} does not have the expected fields ({e!r})") from None
    if not records:
        raise TaskDataError(f"{name}: no records under {root}")
    task_manager = task_manager or lm_eval_task_manager()
    config = dict(load_yaml(task_manager.task_index[spec.lm_eval_name].yaml_path, resolve_func=True))
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    config.update(
        task=name,
        dataset_path=f"local:{root / name}",
        dataset_name=None,
        dataset_kwargs=None,
        training_split=None,
        validation_split=spec.split if spec.split == "validation" else None,
        test_split=spec.split if spec.split == "test" else None,
        fewshot_split=None,
        custom_dataset=lambda **_: datasets.DatasetDict({spec.split: datasets.Dataset.from_list(records)}),
    )
    return ConfigurableTask(config=config)
