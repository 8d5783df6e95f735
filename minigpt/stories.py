"""A generated corpus of short children's stories, made on the spot with no download.

What it is for: offline demos and tests. ``python -m minigpt.train --data stories`` trains on it when the
machine cannot reach the Hugging Face Hub, and the tests use it as a corpus that is always there. It follows the
spirit of TinyStories (simple words, short sentences; a character, a place, a wish or a problem, something that
happens, and a happy ending or a moral), but it is NOT a substitute for TinyStories: a few hundred sentence
templates filled from word lists teach a model far less than two million stories written with a large vocabulary.

How it works: each story is built by one of several plots (a lost toy, a wish that needs help, a fear, sharing,
a rainy day, a hurt animal, a thing that breaks and is made again, a new friend, telling the truth). A plot is a
list of beats; each beat picks one of several sentences and fills it from the word lists (names, animals, objects,
places, feelings, weather, activities). Grammar is kept right by small helpers: ``_a`` chooses "a" or "an" from
the sound of the next word, and each character carries its pronouns (he / she / they, with "was" / "were").

The output is deterministic: story ``i`` of ``generate_stories(n, seed)`` depends only on ``(seed, i)``, and a
story equal to an earlier one is drawn again, so the first ``n`` stories are all different.
"""
from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["CORPUS_VERSION", "DEFAULT_NUM_STORIES", "generate_stories"]

DEFAULT_NUM_STORIES = 20000  # the size of the `stories` data source (about 10 MB of text)
CORPUS_VERSION = 1  # bump whenever the generated text changes: token caches of the `stories` source key on it


# ---------------------------------------------------------------------------------------------------------------
# Grammar helpers
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pronouns:
    subj: str  # he / she / they
    obj: str  # him / her / them
    poss: str  # his / her / their
    refl: str  # himself / herself / themselves
    was: str  # the past of "to be" that agrees with subj: "she was", "they were"


HE = Pronouns("he", "him", "his", "himself", "was")
SHE = Pronouns("she", "her", "her", "herself", "was")
THEY = Pronouns("they", "them", "their", "themselves", "were")

# Words whose first letter misleads: a vowel letter with a "y"/"w" sound, or a silent "h".
_A_BEFORE = {"one", "unicorn", "uniform", "useful", "usual", "ukulele"}
_AN_BEFORE = {"hour", "honest", "heir"}


def _a(phrase: str) -> str:
    """``phrase`` with the right indefinite article: "an old kite", "a unicorn", "an hour"."""
    word = phrase.split()[0].lower()
    if word in _A_BEFORE:
        return "a " + phrase
    if word in _AN_BEFORE or word[0] in "aeiou":
        return "an " + phrase
    return "a " + phrase


@dataclass(frozen=True)
class Character:
    name: str
    kind: str  # "girl", "boy", "kid" or an animal
    pronouns: Pronouns


# ---------------------------------------------------------------------------------------------------------------
# Word lists
# ---------------------------------------------------------------------------------------------------------------

GIRLS = ["Lily", "Mia", "Sara", "Ella", "Zoe", "Anna", "Lucy", "Emma", "Ruby", "Nora", "Ivy", "Maya", "Amy",
         "Daisy", "Rosa", "Hana", "Lena", "Tara"]
BOYS = ["Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Tim", "Finn", "Owen", "Eli", "Noah", "Oscar", "Omar", "Kofi",
        "Ravi", "Hugo", "Luca", "Adam"]
THEY_NAMES = ["Alex", "Robin", "Kai", "Sky", "River", "Jules", "Remy", "Ash"]
ANIMALS = ["rabbit", "puppy", "kitten", "bear", "fox", "duck", "owl", "elephant", "otter", "mouse", "frog",
           "turtle", "lion", "squirrel", "ant", "hedgehog", "pig", "unicorn"]
PET_NAMES = ["Pip", "Bubbles", "Coco", "Nibbles", "Sunny", "Pepper", "Biscuit", "Mo", "Dot", "Fluffy", "Whiskers",
             "Tiny", "Button", "Hazel", "Ollie", "Juniper"]
TRAITS = ["little", "happy", "curious", "kind", "brave", "shy", "funny", "clever", "playful", "gentle", "eager",
          "friendly", "busy", "active", "cheerful", "honest"]
GROWN_UPS = [("Mom", SHE), ("Dad", HE), ("Grandma", SHE), ("Grandpa", HE), ("Aunt May", SHE), ("Uncle Joe", HE)]

COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "shiny", "soft", "old", "tiny", "big",
          "striped", "spotted"]
TOYS = ["ball", "kite", "teddy bear", "toy car", "hat", "drum", "book", "blanket", "umbrella", "boat", "doll",
        "yo-yo", "balloon", "robot", "scarf", "whistle", "train", "jump rope", "bucket"]
TREATS = ["apple", "cookie", "orange", "sandwich", "cupcake", "banana", "muffin", "bowl of berries", "pear",
          "piece of cake", "ice cream cone"]
MAKES = [("a sand castle", "built"), ("a tall tower of blocks", "built"), ("a cake", "baked"),
         ("a picture of the sea", "painted"), ("a paper boat", "folded"), ("a snowman", "built"),
         ("a bird house", "built"), ("a necklace of beads", "made"), ("a card for Mom", "made")]

# (name, preposition, hiding spots)
PLACES = [
    ("park", "in", ["under a bench", "behind a tree", "in the tall grass", "next to the slide"]),
    ("garden", "in", ["under a big leaf", "behind the flower pots", "between the carrots", "in a pile of leaves"]),
    ("forest", "in", ["under a fallen log", "behind a mossy rock", "in a pile of leaves", "next to a mushroom"]),
    ("beach", "at", ["under a pile of sand", "behind a big rock", "next to a crab", "near the water"]),
    ("farm", "on", ["in the hay", "behind the barn", "under the cart", "next to the sleepy cow"]),
    ("meadow", "in", ["in the tall grass", "under a bush", "behind a big stone", "among the flowers"]),
    ("backyard", "in", ["under the swing", "behind the shed", "in the sandbox", "under a bush"]),
    ("playground", "at", ["under the slide", "behind the swings", "in the sandbox", "next to the fence"]),
    ("lake", "by", ["under the dock", "behind the reeds", "next to a duck nest", "near the old boat"]),
    ("hill", "on", ["behind a rock", "under a small tree", "in the long grass", "next to a rabbit hole"]),
    ("zoo", "at", ["behind the bench", "near the penguins", "under a map sign", "next to the gate"]),
]
WEATHER = ["The sun was shining and the sky was blue.", "A soft wind was blowing.",
           "White clouds moved across the sky.", "It was a warm day.", "It was a cold and bright day.",
           "Birds were singing in the trees.", "The air smelled like flowers.",
           "Little drops of rain had fallen in the night."]
# (base form, past form)
ACTIVITIES = [("play tag", "played tag"), ("build a fort", "built a fort"), ("jump in puddles", "jumped in puddles"),
              ("sing songs", "sang songs"), ("dance", "danced"), ("run races", "ran races"),
              ("look for bugs", "looked for bugs"), ("draw pictures", "drew pictures"),
              ("read stories", "read stories"), ("play hide and seek", "played hide and seek"),
              ("throw a ball", "threw a ball"), ("pick flowers", "picked flowers"), ("climb trees", "climbed trees")]
OPENERS = ["Once upon a time,", "One day,", "Long ago,", "One morning,", "One afternoon,", "Not long ago,",
           "One bright day,", "Once,"]
HAPPY = ["happy", "glad", "proud", "excited", "joyful"]
SAD = ["sad", "upset", "worried", "unhappy"]
FEARS = [("the dark", "the night light"), ("thunder", "the storm"), ("the big dog next door", "the dog"),
         ("deep water", "the water"), ("the loud vacuum", "the vacuum"), ("the tall slide", "the slide")]
# (animal, the part that is hurt)
HURT_ANIMALS = [("bird", "wing"), ("baby duck", "leg"), ("kitten", "paw"), ("puppy", "paw"), ("butterfly", "wing"),
                ("little owl", "wing"), ("baby rabbit", "leg"), ("hedgehog", "foot"), ("squirrel", "tail")]


def _character(rng: random.Random, avoid: str = "") -> Character:
    """A hero or a friend: a girl, a boy, a kid called "they", or an animal with a name."""
    while True:
        roll = rng.random()
        if roll < 0.3:
            c = Character(rng.choice(GIRLS), "girl", SHE)
        elif roll < 0.6:
            c = Character(rng.choice(BOYS), "boy", HE)
        elif roll < 0.72:
            c = Character(rng.choice(THEY_NAMES), "kid", THEY)
        else:
            c = Character(rng.choice(PET_NAMES), rng.choice(ANIMALS), rng.choice([HE, SHE]))
        if c.name != avoid:
            return c


def _fields(rng: random.Random) -> dict[str, str]:
    """Every slot a sentence template may use, drawn once per story so the story stays consistent."""
    hero = _character(rng)
    friend = _character(rng, avoid=hero.name)
    grown, gp = rng.choice(GROWN_UPS)
    place, prep, spots = rng.choice(PLACES)
    toy = f"{rng.choice(COLORS)} {rng.choice(TOYS)}"
    treat = rng.choice(TREATS)
    act, acted = rng.choice(ACTIVITIES)
    act2, acted2 = rng.choice([a for a in ACTIVITIES if a[0] != act])
    make, made = rng.choice(MAKES)
    fear, fear_short = rng.choice(FEARS)
    hurt, hurt_part = rng.choice(HURT_ANIMALS)
    # What the sharing plot is about; the question must fit the thing ("some" of a cookie, not of a kite).
    if rng.random() < 0.5:
        share, share_ask = _a(treat), "Can I have some too?"
    else:
        share, share_ask = _a(toy), "Can I play with it too?"
    f = {
        "opener": rng.choice(OPENERS), "name": hero.name, "kind": hero.kind,
        "intro": _a(f"{rng.choice(TRAITS)} {hero.kind}"),
        "he": hero.pronouns.subj, "him": hero.pronouns.obj, "his": hero.pronouns.poss,
        "himself": hero.pronouns.refl, "was": hero.pronouns.was,
        "friend": friend.name, "a_friend": _a(friend.kind), "fkind": friend.kind,
        "fhe": friend.pronouns.subj, "fhim": friend.pronouns.obj, "fhis": friend.pronouns.poss,
        "fwas": friend.pronouns.was,
        "grown": grown, "ghe": gp.subj, "ghis": gp.poss,
        "place": place, "at_place": f"{prep} the {place}", "spot": rng.choice(spots),
        "toy": toy, "a_toy": _a(toy), "treat": treat, "a_treat": _a(treat), "share": share, "share_ask": share_ask,
        "make": make, "made": made, "act": act, "acted": acted, "act2": act2, "acted2": acted2,
        "weather": rng.choice(WEATHER), "happy": rng.choice(HAPPY), "sad": rng.choice(SAD),
        "fear": fear, "fear_short": fear_short, "hurt": hurt, "a_hurt": _a(hurt), "hurt_part": hurt_part,
    }
    for key in ("he", "his", "fhe", "fhis", "ghe"):  # sentence-initial forms: {He}, {Fhe}, ...
        f[key[0].upper() + key[1:]] = f[key][0].upper() + f[key][1:]
    return f


# ---------------------------------------------------------------------------------------------------------------
# Plots: each returns the story's paragraphs; `say` picks one of its templates and fills it
# ---------------------------------------------------------------------------------------------------------------

def _intro(say) -> str:
    return " ".join([
        say("{opener} there was {intro} named {name}.", "There once was {intro} named {name}.",
            "{opener} in a small town, there lived {intro} called {name}.",
            "In a house near the {place}, there lived {intro} named {name}."),
        say("{He} loved to {act} {at_place}.", "{His} favorite thing was to {act} with {his} friend {friend}.",
            "Every day, {he} went to {act} {at_place}."),
    ])


def _lost_toy(say) -> list[str]:
    return [
        _intro(say) + " " + say("{name} had {a_toy} that {he} loved very much.",
                                "{His} best toy was {a_toy}."),
        say("One day, {name} went to play {at_place}. {weather} {He} played with {his} {toy} all morning.",
            "{weather} {name} took {his} {toy} to play {at_place}."),
        say("When it was time to go home, the {toy} was gone! {name} felt {sad}.",
            "Then {name} looked down. {His} {toy} was not there! {He} {was} very {sad}."),
        say('{friend} saw {him} and asked, "Why are you {sad}?" "I lost my {toy}," said {name}.',
            '"What is wrong?" asked {friend}. "I cannot find my {toy}," said {name}.'),
        say('"I will help you," said {friend}. They looked everywhere. At last, {friend} found the {toy} {spot}.',
            "{friend} and {name} looked high and low. Then {name} saw something {spot}. It was the {toy}!"),
        say("{name} hugged {his} friend. \"Thank you!\" {he} said. Good friends help each other.",
            "{name} was {happy} again. From that day on, {he} always kept {his} {toy} close. "
            "A good friend is a great treasure."),
    ]


def _needs_help(say) -> list[str]:
    return [
        _intro(say),
        say("One day, {name} saw a big red apple at the top of a tree. {He} wanted it very much.",
            "One day, {name}'s {toy} got stuck high up in a tree {at_place}.",
            "One day, {name} wanted to reach {a_treat} on a high shelf."),
        say("{He} jumped and jumped, but {he} could not reach it. {He} {was} too small.",
            "{He} tried to climb, but {he} slipped and fell on the soft grass.",
            "{He} stood on {his} toes, but it was still too high."),
        say('Then {his} friend {friend} came by. "Can I help?" asked {friend}.',
            "{name} felt {sad}. Just then, {his} friend {friend} walked by."),
        say("{friend} had an idea. {Fhe} stood still, and {name} climbed on {fhis} back. Now {name} could reach it!",
            "They found a long stick. Together, they pushed and pulled until it came down.",
            '"Let\'s work together," said {friend}. They got a small box, and {name} stood on it. It worked!'),
        say("{name} said thank you and shared it with {friend}. Working together makes hard things easy.",
            "Both friends laughed. They learned that two can do what one cannot.",
            "{name} was {happy}. {He} learned that it is good to ask for help."),
    ]


def _fear(say) -> list[str]:
    return [
        _intro(say) + " " + say("But {name} was afraid of {fear}.", "There was one thing {name} did not like: {fear}."),
        say("One night, {he} hid under {his} blanket and would not come out.",
            "When {he} thought about {fear_short}, {his} heart beat fast.",
            "One evening, {name} began to cry because of {fear_short}."),
        say('{grown} sat down next to {him}. "What is wrong?" {ghe} asked.',
            "{grown} came in and gave {him} a warm hug."),
        say('"I am scared," said {name}. "It is okay to be scared," said {grown}. "Everyone is scared sometimes."',
            '"I don\'t like {fear}," said {name}. {grown} smiled. "Let\'s look at it together," {ghe} said.'),
        say("{name} took a deep breath. {He} held {grown}'s hand and looked. It was not so bad after all.",
            "Step by step, {name} tried again. Each time, {he} felt a little less scared."),
        say("Soon {name} was not afraid anymore. {He} felt brave and {happy}. Being brave does not mean you are "
            "never scared.",
            "The next day, {name} told {friend} all about it. \"I was brave!\" {he} said with a big smile."),
    ]


def _sharing(say) -> list[str]:
    return [
        _intro(say),
        say("One day, {name} had {share}. It looked so good!", "{name} got {share} as a present. {He} loved it."),
        say('{friend} came over and looked at it. "{share_ask}" {fhe} asked.',
            '{friend} saw it too. "{share_ask}" {fhe} asked nicely.'),
        say('"No, it is mine!" said {name}. {friend} walked away. {Fhe} {fwas} {sad}.',
            "At first, {name} did not want to share. {He} held it close and said no."),
        say("Then {name} felt bad inside. {He} thought about how {friend} felt.",
            "{name} sat alone {at_place}. It was not much fun without {his} friend."),
        say('{He} ran to {friend}. "I am sorry. Let\'s share," {he} said. {friend} smiled a big smile.',
            '"Here, we can share it," said {name}. {friend} said thank you, and they played together.'),
        say("Sharing made them both {happy}. It is more fun when you share.",
            "From that day on, {name} always shared with {his} friends. Sharing is caring."),
    ]


def _rainy_day(say) -> list[str]:
    return [
        _intro(say),
        say("One morning, {name} and {friend} made a plan to {act} {at_place}.",
            "{name} woke up early. Today {he} would go to the {place} with {friend}!"),
        say("But then dark clouds came, and it began to rain. Drip, drop, drip.",
            "Just as they put on their shoes, the rain began to fall. The wind blew hard."),
        say("{name} looked out the window. {He} felt {sad}. \"Now we cannot go,\" {he} said.",
            "{name} sat by the door with a frown. {He} {was} very {sad}."),
        say('{grown} smiled. "You can still have fun inside," {ghe} said. So {name} and {friend} decided to {act2}.',
            '"Let\'s {act2} inside!" said {friend}. {name} thought it was a great idea.'),
        say("They laughed and laughed. They even built a fort with pillows.",
            "They had so much fun that they forgot all about the rain."),
        say("After a while, the sun came out. They ran outside and saw a big rainbow. A rainy day can be fun too.",
            "When the rain stopped, they went to the {place} after all. It was the best day ever."),
    ]


def _hurt_animal(say) -> list[str]:
    return [
        _intro(say),
        say("One day, {name} went for a walk {at_place}. {weather}", "{weather} {name} was playing {at_place}."),
        say("Suddenly, {he} heard a small sound. It was {a_hurt} with a hurt {hurt_part}.",
            "{name} saw {a_hurt} {spot}. Its {hurt_part} was hurt, and it looked scared."),
        say("{name} wanted to help. {He} picked it up very gently.",
            "{name} was kind. {He} said softly, \"Don't be scared. I will help you.\""),
        say("{He} took it home to {grown}. Together they made a soft bed in a box and gave it water.",
            "{grown} showed {him} how to wrap the hurt {hurt_part}. {name} fed it every day."),
        say("After a few days, the {hurt} was strong again. It was ready to go home.",
            "Soon the {hurt} felt much better."),
        say("{name} took it back {at_place}, and it found its mom. {name} felt {happy}. Being kind is always good.",
            "{name} let it go {at_place}. It looked back as if to say thank you. {name} smiled all day."),
    ]


def _make_again(say) -> list[str]:
    return [
        _intro(say),
        say("One day, {name} {made} {make}. {He} worked very hard on it.",
            "{name} wanted to make something special, so {he} {made} {make}."),
        say("It was almost done when something bad happened. {friend} bumped into it, and it fell apart.",
            "Then a big gust of wind came, and it was ruined!",
            "But {he} made a mistake, and it all went wrong."),
        say("{name} felt {sad}. {He} wanted to cry. \"I will never make it again,\" {he} said.",
            "{name} sat down with a frown. All {his} hard work was gone."),
        say('{grown} came and said, "You can try again. This time, I will help you."',
            '{friend} said, "I am sorry. Can I help you make a new one?"'),
        say("So they started again, step by step. This time, it was even better than before.",
            "{name} tried again. It was hard, but {he} did not give up."),
        say("{name} felt very {happy}. If you keep trying, you can do hard things.",
            "{name} learned that mistakes are part of learning. {He} smiled at what {he} had made."),
    ]


def _new_friend(say) -> list[str]:
    return [
        _intro(say),
        say("One day, a new {fkind} came to the {place}. {Fhe} {fwas} called {friend}.",
            "One morning, {name} saw {a_friend} {he} did not know. {Fhis} name was {friend}.",
            "A new family moved in next door. They had {a_friend} named {friend}."),
        say("{friend} stood alone and did not say a word. {Fhe} looked shy.",
            "{friend} wanted to play, but {fhe} {fwas} too shy to ask."),
        say("{name} felt a little shy too. But {he} remembered how it feels to be new.",
            "{name} thought for a moment. Then {he} walked over with a smile."),
        say('"Hello! Do you want to {act} with me?" asked {name}. {friend} smiled and nodded.',
            '"Hi, I am {name}. Do you want to play?" {friend} said yes.'),
        say("They {acted} until the sun went down. They {acted2} too.",
            "They {acted} all afternoon and laughed a lot."),
        say("From that day on, {name} and {friend} were best friends. A kind word can make a new friend.",
            "Now {name} had a new friend, and {he} {was} very {happy}."),
    ]


def _truth(say) -> list[str]:
    return [
        _intro(say),
        say("One day, {name} was playing with a ball in the house. {grown} had said not to play ball inside.",
            "{name} was running in the kitchen, even though {grown} said to walk."),
        say("Crash! {He} knocked over {grown}'s favorite vase. It broke into many pieces.",
            "Oops! {He} bumped the table, and a cup fell and broke."),
        say("{name} was scared. {He} thought about hiding the pieces.",
            "{name} wanted to say that {friend} did it. {He} felt a knot in {his} tummy."),
        say("But {he} knew that lying was wrong. {He} went to {grown} and told the truth.",
            '{name} took a deep breath. "{grown}, I broke it. I am sorry," {he} said.'),
        say('{grown} gave {him} a hug. "Thank you for telling me the truth," {ghe} said.',
            "{grown} was a little sad about it, but {ghe} was proud of {name} for being honest."),
        say("They cleaned up together. {name} felt light and {happy}. It is always best to tell the truth.",
            "{name} learned that telling the truth makes you feel better inside."),
    ]


PLOTS = [_lost_toy, _needs_help, _fear, _sharing, _rainy_day, _hurt_animal, _make_again, _new_friend, _truth]


def _story(rng: random.Random) -> str:
    f = _fields(rng)

    def say(*templates: str) -> str:
        return rng.choice(templates).format(**f)

    paragraphs = rng.choice(PLOTS)(say)
    # Two or three paragraphs, as TinyStories often has: split the beats at one or two random places.
    cuts = sorted(rng.sample(range(1, len(paragraphs)), rng.choice([1, 2])))
    parts = [" ".join(paragraphs[a:b]) for a, b in zip([0] + cuts, cuts + [len(paragraphs)])]
    return "\n\n".join(parts)


def generate_stories(n: int, seed: int = 0) -> Iterator[str]:
    """Yield ``n`` distinct stories (60-200 words each), the same ones for the same ``(n, seed)``.

    Story ``i`` uses its own random stream seeded by ``(seed, i)``, so the first stories do not change when ``n``
    grows; a duplicate of an earlier story is redrawn (the check keeps an 8-byte digest per story).
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    seen: set[bytes] = set()
    for i in range(n):
        attempt = 0
        while True:
            story = _story(random.Random(f"minigpt-stories:{seed}:{i}:{attempt}"))
            digest = hashlib.blake2b(story.encode(), digest_size=8).digest()
            if digest not in seen:
                seen.add(digest)
                break
            attempt += 1
        yield story


def main(argv: list[str] | None = None) -> int:
    """Print a few stories: ``python -m minigpt.stories [N] [SEED]``; returns the exit status."""
    import argparse

    from kernels.cli import run_cli

    p = argparse.ArgumentParser(prog="python -m minigpt.stories", description="Print generated stories.")
    p.add_argument("n", nargs="?", type=int, default=3, help="how many (default 3)")
    p.add_argument("seed", nargs="?", type=int, default=0, help="corpus seed (default 0)")
    args = p.parse_args(argv)
    if args.n < 0:
        raise SystemExit(f"error: N must be 0 or more, got {args.n} — e.g. python -m minigpt.stories 3")

    def show() -> None:
        for story in generate_stories(args.n, args.seed):
            print(story, end="\n\n---\n\n")

    return run_cli(show)


if __name__ == "__main__":
    sys.exit(main())
