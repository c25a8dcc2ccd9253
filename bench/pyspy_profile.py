"""Where a relay view spends its time: py-spy's raw samples, reduced to the frames below it.

``record(pid, seconds, out)`` starts ``py-spy record --subprocesses --format raw`` on a
gunicorn master (so its workers are sampled too). py-spy's raw (collapsed) format is one
line per distinct stack, ``frame;frame;...;frame COUNT``, outermost frame first, a frame
being ``function (file:line)``; lines py-spy adds about processes or threads are frames
that match no view and are skipped with the rest.

``below_view(text, view_file)`` keeps the stacks that pass through a function of
``view_file`` (the Flask views, relay/api.py) and counts, for every function deeper than
the first such frame, the samples whose stack holds it (inclusive; once per sample even
when recursive), keyed by function and file, whatever the line.
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
        *(py_spy, "record", "--subprocesses", "--format", "raw", "--rate", str(RATE)),
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


def below_view(text: str, view_file: str = "relay/api.py") -> Profile:
    """The profile of the stacks that pass through ``view_file``."""
    profile = Profile()
    for line in text.splitlines():
        parsed = parse_line(line)
        if parsed is None:
            continue
        frames, count = parsed
        profile.busy += count
        view_at = next((i for i, f in enumerate(frames) if is_view(f, view_file)), None)
        if view_at is None:
            continue
        view = frames[view_at]
        assert view is not None
        profile.in_view += count
        profile.views[view.function] += count
        add_below(profile, [f for f in frames[view_at + 1 :] if f is not None], count)
    return profile


def is_view(frame: Frame | None, view_file: str) -> bool:
    """A function of ``view_file`` running (not the module being imported)."""
    return frame is not None and frame.file.endswith(view_file) and frame.function != "<module>"


def add_below(profile: Profile, frames: list[Frame], count: int) -> None:
    seen: set[tuple[str, str]] = set()
    for frame in frames:
        key = (frame.function, frame.file)
        if frame.line is not None:
            profile.lines.setdefault(key, Counter())[frame.line] += count
        if key not in seen:
            seen.add(key)
            profile.inclusive[key] += count
