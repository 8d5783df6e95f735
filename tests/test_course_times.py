"""benchmarks/course_times.py: it finds and runs COURSE.md's blocks as tests/test_course.py does, and a failing block
is a one-line error (the times themselves belong to its results, not to a test)."""
from __future__ import annotations

import pytest

from benchmarks import course_times
from benchmarks.common import BenchmarkError

COURSE_TEXT = """# A course

```text
pip install nothing
```

## Lesson 0 — two blocks

```bash
echo one > made.txt && test -s made.txt
```

## Lesson 1 — python

```python
assert sum(range(4)) == 6
```
"""


def test_blocks_are_the_runnable_ones_under_their_lessons(tmp_path):
    course = tmp_path / "COURSE.md"
    course.write_text(COURSE_TEXT)
    assert course_times.course_blocks(course) == [
        ("Lesson 0", "bash", "echo one > made.txt && test -s made.txt\n"),
        ("Lesson 1", "python", "assert sum(range(4)) == 6\n")]


def test_each_block_is_timed_in_a_fresh_folder(tmp_path):
    course = tmp_path / "COURSE.md"
    course.write_text(COURSE_TEXT)
    rows = course_times.time_course(course)
    assert [(r["block"], r["language"]) for r in rows] == [("Lesson0-1", "bash"), ("Lesson1-1", "python")]
    assert all(r["seconds"] > 0 for r in rows)
    assert not (tmp_path / "made.txt").exists()  # the bash block ran elsewhere
    assert "<- slowest" in course_times.summarize(rows)


def test_a_failing_block_is_a_one_line_error(tmp_path):
    course = tmp_path / "COURSE.md"
    course.write_text("## Lesson 3 — broken\n\n```bash\necho partial | false\necho never\n```\n")
    with pytest.raises(BenchmarkError, match="COURSE.md Lesson3-1 \\(bash\\) failed") as info:
        course_times.time_course(course)
    assert "\n" not in str(info.value)


def test_the_real_course_has_blocks_in_every_lesson():
    lessons = {lesson for lesson, _, _ in course_times.course_blocks()}
    assert lessons == {f"Lesson {n}" for n in range(13)}
