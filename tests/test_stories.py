"""The generated stories corpus: distinct, deterministic, sized and grammatical."""
from __future__ import annotations

import re
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from minigpt import stories
from minigpt.stories import DEFAULT_NUM_STORIES, generate_stories

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def first_5000() -> list[str]:
    return list(generate_stories(5000, seed=0))


def test_distinct_and_deterministic(first_5000):
    assert len(first_5000) == 5000
    assert len(set(first_5000)) == 5000
    assert list(generate_stories(300, seed=0)) == first_5000[:300]  # same seed, same stories; a prefix is stable
    other = list(generate_stories(300, seed=1))
    assert len(set(other) & set(first_5000[:300])) < 5  # another seed gives other stories


def test_lengths_and_shape(first_5000):
    words = [len(s.split()) for s in first_5000]
    assert min(words) >= 60 and max(words) <= 200
    for s in first_5000[:500]:
        assert s[0].isupper() and s.rstrip()[-1] in '.!"'
        assert "{" not in s and "}" not in s and "  " not in s
        assert not re.search(r"[.!?] +[a-z]", s), s  # sentences start with a capital (dialogue tags aside)


def test_articles_agree(first_5000):
    # Every "a"/"an" checked against the first letter, allowing only the words whose sound differs from it.
    a_before_vowel_letter = {"unicorn", "one", "uniform", "useful", "usual", "ukulele"}
    an_before_consonant_letter = {"honest", "hour", "heir"}
    for s in first_5000:
        for article, word in re.findall(r"\b([Aa]n?) ([A-Za-z]+)", s):
            vowel = word[0].lower() in "aeiou"
            if article.lower() == "a":
                assert not vowel or word.lower() in a_before_vowel_letter, (article, word)
            else:
                assert vowel or word.lower() in an_before_consonant_letter, (article, word)


def test_pronouns_agree(first_5000):
    text = "\n".join(first_5000)
    for wrong in (r"\b[Tt]hey was\b", r"\b[Hh]e were\b", r"\b[Ss]he were\b", r"\bthem(self)\b", r"\b[Tt]hey has\b"):
        assert not re.search(wrong, text), wrong
    # All three pronoun sets are used, with their own forms of "to be".
    for right in (r"\b[Ss]he was\b", r"\b[Hh]e was\b", r"\b[Tt]hey were\b", r"\bthemselves\b|\btheir\b"):
        assert re.search(right, text), right


def test_variety(first_5000):
    names = stories.GIRLS + stories.BOYS + stories.THEY_NAMES + stories.PET_NAMES
    text = "\n".join(first_5000)
    assert all(name in text for name in names)
    assert all(place in text for place, _, _ in stories.PLACES)
    first_sentences = {s.split(".")[0] for s in first_5000}
    assert len(first_sentences) > 1000
    vocabulary = set(re.findall(r"[a-z']+", text.lower()))
    assert len(vocabulary) > 500
    # Each plot shows up: one pattern per plot, matching words that every variant of one of its beats uses.
    assert len(stories.PLOTS) == 9
    for marker in (r"lost my|cannot find my", r"could not reach|slipped and fell|too high", r"afraid of|did not like:",
                   r"Can I have some|Can I play with it", r"began to rain|rain began to fall",
                   r"with a hurt|was hurt, and", r"fell apart|was ruined|all went wrong", r"too shy to ask|looked shy",
                   r"the truth|I broke it"):
        assert sum(bool(re.search(marker, s)) for s in first_5000) > 100, marker


def test_small_n_and_bad_n():
    assert list(generate_stories(0)) == []
    assert len(list(islice(generate_stories(3, seed=7), 10))) == 3
    with pytest.raises(ValueError):
        list(generate_stories(-1))
    assert DEFAULT_NUM_STORIES == 20000


def test_cli_refuses_a_negative_count_in_one_line():
    with pytest.raises(SystemExit) as info:
        stories.main(["-1"])
    assert str(info.value.code) == "error: N must be 0 or more, got -1 — e.g. python -m minigpt.stories 3"


def test_cli_prints_stories_and_ends_quietly_when_its_output_is_closed(capsys):
    assert stories.main(["2", "5"]) == 0
    assert capsys.readouterr().out.split("\n\n---\n\n")[:2] == list(generate_stories(2, seed=5))
    proc = subprocess.Popen([sys.executable, "-m", "minigpt.stories", "2000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b""
