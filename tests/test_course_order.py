"""Exercises before the answers: in every lesson of COURSE.md that has an exercise, the text before the exercise
does not name the function the exercise asks for (nor its solution file), and the text after it does — the reading
of the real kernel comes once the reader has written their own.

Which function each exercise asks for comes from the exercises' registry (``exercises.check.EXERCISES``: the real
function its blank copies), so a renamed kernel or a new exercise is covered without editing this file.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from exercises.check import EXERCISES, Exercise

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "COURSE.md"


def lesson_text(course: str, lesson: int) -> str:
    """The text of lesson ``lesson`` of ``course``: from its ``## Lesson N`` heading to the next ``## `` heading."""
    found = re.search(rf"^## Lesson {lesson}\b.*?(?=^## |\Z)", course, re.M | re.S)
    assert found, f"COURSE.md has no '## Lesson {lesson}' (exercise registry says so)"
    return found.group(0)


def exercise_marker(exercise: Exercise) -> str:
    return f"**Exercise `{exercise.name}`.**"


def answers(exercise: Exercise) -> list[str]:
    """What gives the exercise's answer away: the real function its blank copies (and any other it also copies), and
    its solution file."""
    return [exercise.real_function, *exercise.also_copies, exercise.path(solution=True).relative_to(ROOT).as_posix()]


def _names(text: str, name: str) -> bool:
    """Whether ``text`` names ``name`` as a whole word (``_fwd_inner`` is not named by ``_forward_inner``)."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def spoilers(course: str, exercise: Exercise) -> list[str]:
    """What is wrong with the order of ``exercise``'s lesson in the COURSE.md text ``course`` (empty: nothing)."""
    lesson = lesson_text(course, exercise.lesson)
    marker = exercise_marker(exercise)
    if lesson.count(marker) != 1:
        return [f"lesson {exercise.lesson} should hold the exercise's marker {marker!r} once, "
                f"found it {lesson.count(marker)} times"]
    before, after = lesson.split(marker)
    problems = []
    for name in answers(exercise):
        if _names(before, name):
            line = next(line for line in before.splitlines() if _names(line, name))
            problems.append(f"lesson {exercise.lesson} names {name} before exercise {exercise.name}, "
                            f"which asks for it: {line.strip()[:120]!r}")
        if not _names(after, name):
            problems.append(f"lesson {exercise.lesson} does not name {name} after exercise {exercise.name} "
                            f"(the reading of the answer, once the exercise is done)")
    return problems


@pytest.mark.parametrize("name", list(EXERCISES))
def test_lesson_gives_the_exercise_before_its_answer(name):
    problems = spoilers(COURSE.read_text(encoding="utf-8"), EXERCISES[name])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(EXERCISES))
def test_the_check_catches_an_answer_read_before_the_exercise(name):
    """The check is not vacuous: put the function back into the reading before the exercise and it fails."""
    exercise = EXERCISES[name]
    course = COURSE.read_text(encoding="utf-8")
    marker = exercise_marker(exercise)
    spoiled = course.replace(marker, f"**Read** `{exercise.real_file}` — `{exercise.real_function}`.\n\n{marker}")
    assert any(f"names {exercise.real_function} before" in p for p in spoilers(spoiled, exercise))
    # and the other way: a lesson that never gets round to the real kernel fails too
    lesson = lesson_text(course, exercise.lesson)
    _, after = lesson.split(marker)
    unread = course.replace(after, after.replace(exercise.real_function, "the kernel"))
    assert any(f"does not name {exercise.real_function} after" in p for p in spoilers(unread, exercise))


def test_every_exercise_of_the_course_is_in_the_registry():
    """The markers of COURSE.md and the registry agree, so no exercise escapes the order check."""
    named = set(re.findall(r"\*\*Exercise `(\w+)`\.\*\*", COURSE.read_text(encoding="utf-8")))
    assert named == set(EXERCISES)
