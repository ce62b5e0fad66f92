"""Scoring predictions against reference answers, and loading users' own questions."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..core.errors import KvcliError
from ..core.fileio import read_text_file
from .tasks import Task

METRICS = ("all", "any")


def normalize(text: str) -> str:
    """Lower-case and collapse runs of whitespace to one space."""
    return " ".join(str(text).lower().split())


def contains_answer(prediction: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``prediction`` as a whole unit: an answer that starts
    (ends) with a letter or digit must not be glued to another letter or digit there, so
    1234567 does not match inside 12345678 and "red" not inside "bored"."""
    ans = normalize(answer)
    if not ans:
        return False
    pattern = re.escape(ans)
    if ans[0].isalnum():
        pattern = r"(?<![^\W_])" + pattern
    if ans[-1].isalnum():
        pattern = pattern + r"(?![^\W_])"
    return re.search(pattern, normalize(prediction)) is not None


def score_answers(answers: list[str], metric: str, prediction: str) -> float:
    """``all``: fraction of ``answers`` found; ``any``: 1.0 if any is found, else 0.0."""
    if metric not in METRICS:
        raise KvcliError(f"unknown metric {metric!r} (choose from all, any)")
    if not answers:
        return 0.0
    found = [contains_answer(prediction, a) for a in answers]
    if metric == "any":
        return 1.0 if any(found) else 0.0
    return sum(found) / len(found)


def score(task: Task, prediction: str) -> float:
    """Score in [0, 1] of ``prediction`` for ``task`` (case- and whitespace-insensitive)."""
    return score_answers(task.answers, task.metric, prediction)


def load_questions(path) -> list[dict]:
    """Read a JSONL file of {"question": ..., "answer": ...} or {"question": ...,
    "answers": [...]} (optional "metric": "any" (default) or "all"). Blank lines are
    skipped. Returns dicts with "question", "answers" (list of str) and "metric", plus any
    other keys the line had. Raises KvcliError naming the line for malformed input."""
    p = Path(path)
    lines = read_text_file(p, "questions file").splitlines()  # a regular UTF-8 file, size-capped
    out: list[dict] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p.name} line {no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KvcliError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise KvcliError(f'{where}: expected a JSON object like {{"question": "...", "answer": "..."}}')
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            raise KvcliError(f'{where}: "question" must be a non-empty string')
        if "answer" in obj and "answers" in obj:
            raise KvcliError(f'{where}: give either "answer" or "answers", not both')
        if "answer" in obj:
            raw = [obj.pop("answer")]
        elif "answers" in obj:
            raw = obj.pop("answers")
            if not isinstance(raw, list) or not raw:
                raise KvcliError(f'{where}: "answers" must be a non-empty list')
        else:
            raise KvcliError(f'{where}: missing "answer" (or "answers")')
        answers = []
        for a in raw:
            if isinstance(a, bool) or not isinstance(a, (str, int, float)) or not str(a).strip():
                raise KvcliError(f"{where}: answers must be non-empty strings or numbers")
            answers.append(str(a))
        metric = obj.get("metric", "any")
        if metric not in METRICS:
            raise KvcliError(f'{where}: "metric" must be "any" or "all"')
        obj.update(question=question, answers=answers, metric=metric)
        out.append(obj)
    if not out:
        raise KvcliError(f"questions file {p} has no questions")
    return out
