"""Where a relay view spends its time: py-spy's raw samples, reduced to the frames below it.

``record(pid, seconds, out)`` starts ``py-spy record --subprocesses --gil --format raw`` on
a gunicorn master (so its workers are sampled too), sampling the thread that holds the GIL:
where the CPU goes, not where threads wait. py-spy's raw (collapsed) format is one
line per distinct stack, ``frame;frame;...;frame COUNT``, outermost frame first, a frame
being ``function (file:line)``; lines py-spy adds about processes or threads are frames
that match no view and are skipped with the rest.

``below_view(text)`` keeps the stacks that pass through a view (``VIEWS``: the Flask views of
relay/api.py, and the functions of relay/quick_answers.py that answer in front of Flask) and
counts, for every function deeper than the first such frame, the samples whose stack holds
it (inclusive; once per sample even when recursive), keyed by function and file, whatever
the line. It also counts, over every sample, the function running at its top (self time):
where a path's CPU goes when the view itself is a small part of it.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

RATE = 250
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int | None


@dataclass
class Profile:
    """Samples inside a view and, per function below it, the samples holding it."""

    busy: int = 0  # every sample read (py-spy leaves idle threads out)
    in_view: int = 0
    views: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[tuple[str, str]] = field(default_factory=Counter)
    lines: dict[tuple[str, str], Counter[int]] = field(default_factory=dict)
    running: Counter[tuple[str, str]] = field(default_factory=Counter)

    def top_running(self, count: int = 5) -> list[tuple[float, str]]:
        """The ``count`` functions most often at the top of a stack: (share of all samples,
        label)."""
        busy = max(self.busy, 1)
        return [(n / busy, f"{f} ({file})") for (f, file), n in self.running.most_common(count)]

    def top(self, count: int = 5) -> list[tuple[float, str]]:
        """The ``count`` heaviest functions: (share of the view's samples, label)."""
        out = []
        for key, samples in self.inclusive.most_common(count):
            function, file = key
            lines = self.lines.get(key)
            where = f"{file}:{lines.most_common(1)[0][0]}" if lines else file
            out.append((samples / max(self.in_view, 1), f"{function} ({where})"))
        return out


def record(pid: int, seconds: int, out: Path, py_spy: str) -> subprocess.Popen[bytes]:
    """Start sampling the process ``pid`` and its children for ``seconds``."""
    command = [
        *(py_spy, "record", "--subprocesses", "--gil", "--format", "raw", "--rate", str(RATE)),
        *("-o", str(out), "--pid", str(pid), "--duration", str(seconds)),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def parse_frame(text: str) -> Frame | None:
    """``function (file:line)`` or ``function (file)``; None for anything else."""
    text = text.strip()
    opening = text.rfind(" (")
    if opening < 0 or not text.endswith(")"):
        return None
    function, where = text[:opening], text[opening + 2 : -1]
    file, _, line = where.rpartition(":")
    if not file or not line.isdigit():
        file, line = where, ""
    return Frame(function, short_file(file), int(line) if line else None)


def short_file(file: str) -> str:
    """A path relative to the repository or to site-packages, as py-spy may not shorten it."""
    for prefix in (f"{REPO}/", "/site-packages/", "/dist-packages/"):
        at = file.find(prefix)
        if at >= 0:
            return file[at + len(prefix) :]
    return file


def parse_line(line: str) -> tuple[list[Frame | None], int] | None:
    """The frames and sample count of one raw line; None for a blank or malformed line."""
    stack, _, count = line.rstrip().rpartition(" ")
    if not stack or not count.isdigit():
        return None
    return [parse_frame(part) for part in stack.split(";")], int(count)


#: Where a request's own work starts: the Flask views, and the functions that answer in
#: front of Flask (relay/quick_answers.py).
VIEWS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("relay/api.py", None),
    ("relay/quick_answers.py", ("QuickAnswers._send", "QuickAnswers._quote")),
)


def below_view(text: str) -> Profile:
    """The profile of the stacks that pass through a view (VIEWS)."""
    profile = Profile()
    for line in text.splitlines():
        parsed = parse_line(line)
        if parsed is None:
            continue
        frames, count = parsed
        profile.busy += count
        top = next((f for f in reversed(frames) if f is not None), None)
        if top is not None:
            profile.running[(top.function, top.file)] += count
        view_at = next((i for i, f in enumerate(frames) if is_view(f)), None)
        if view_at is None:
            continue
        view = frames[view_at]
        assert view is not None
        profile.in_view += count
        profile.views[view.function] += count
        add_below(profile, [f for f in frames[view_at + 1 :] if f is not None], count)
    return profile


def is_view(frame: Frame | None) -> bool:
    """A view running (not its module being imported)."""
    if frame is None or frame.function == "<module>":
        return False
    return any(
        frame.file.endswith(file) and (functions is None or frame.function in functions)
        for file, functions in VIEWS
    )


def add_below(profile: Profile, frames: list[Frame], count: int) -> None:
    seen: set[tuple[str, str]] = set()
    for frame in frames:
        key = (frame.function, frame.file)
        if frame.line is not None:
            profile.lines.setdefault(key, Counter())[frame.line] += count
        if key not in seen:
            seen.add(key)
            profile.inclusive[key] += count
