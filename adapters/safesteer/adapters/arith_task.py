"""A benign fine-tune task: arithmetic word problems answered in a fixed format.

Problems are drawn from templates (shopping, change, travel time, distance, recipes, ages,
areas, tiles, savings, shared bills), every number picked so the answer is a whole number.
A reference answer works the problem in one short line per step and ends with the line
`Answer: <integer>`; the task skill is the share of answers whose `Answer:` integer is right.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANSWER_PREFIX = "Answer:"
TIMES = "\N{MULTIPLICATION SIGN}"  # in the worked steps
NAMES: tuple[str, ...] = (
    "Maya", "Tom", "Aisha", "Luca", "Priya", "Jonas", "Elena", "Kwame", "Sofia", "Ben",
    "Hana", "Omar", "Clara", "Diego", "Mei", "Noah", "Zara", "Ivan", "Lena", "Sam",
    "Ada", "Felix", "Nina", "Raj", "Grace", "Leo", "Yuki", "Ines", "Theo", "Amara",
)  # fmt: skip
ITEMS: tuple[str, ...] = (
    "notebooks", "pens", "apples", "mugs", "candles", "tickets", "bread rolls", "stamps",
    "plant pots", "socks", "erasers", "postcards", "batteries", "lemons", "cupcakes",
)  # fmt: skip
VEHICLES: tuple[str, ...] = ("train", "bus", "ferry", "car", "cyclist", "coach", "tram")
INGREDIENTS: tuple[tuple[str, str], ...] = (
    ("flour", "grams"),
    ("sugar", "grams"),
    ("butter", "grams"),
    ("rice", "grams"),
    ("milk", "millilitres"),
    ("stock", "millilitres"),
    ("oats", "grams"),
    ("cheese", "grams"),
)
SPEEDS: tuple[int, ...] = (12, 15, 20, 24, 30, 36, 40, 45, 48, 50, 60, 72, 75, 80, 90, 120)


@dataclass(frozen=True)
class ArithProblem:
    """One word problem, its worked reference answer and the integer it comes to."""

    template: str
    prompt: str
    solution: str
    answer: int


def _worked(steps: Sequence[str], answer: int) -> str:
    return "\n".join([*steps, f"{ANSWER_PREFIX} {answer}"])


def _shopping(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    first, second = rng.sample(ITEMS, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    p, q = rng.randint(2, 15), rng.randint(2, 15)
    x, y = a * p, b * q
    prompt = (
        f"{name} buys {a} {first} at ${p} each and {b} {second} at ${q} each. "
        f"How many dollars does {name} spend in total?"
    )
    steps = [
        f"{a} {first} cost {a} {TIMES} {p} = {x} dollars.",
        f"{b} {second} cost {b} {TIMES} {q} = {y} dollars.",
        f"In total: {x} + {y} = {x + y} dollars.",
    ]
    return prompt, steps, x + y


def _change(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    count, price = rng.randint(2, 8), rng.randint(2, 12)
    cost = count * price
    note = next(n for n in (20, 50, 100, 200) if n > cost)
    prompt = (
        f"{name} buys {count} {item} that cost ${price} each and pays with a ${note} note. "
        "How many dollars of change does the shop give back?"
    )
    steps = [
        f"The {item} cost {count} {TIMES} {price} = {cost} dollars.",
        f"Change: {note} - {cost} = {note - cost} dollars.",
    ]
    return prompt, steps, note - cost


def _travel_time(rng: random.Random) -> tuple[str, list[str], int]:
    vehicle, speed = rng.choice(VEHICLES), rng.choice(SPEEDS)
    minutes = rng.randint(1, 12) * 5
    while speed * minutes % 60:
        minutes += 5
    distance = speed * minutes // 60
    prompt = (
        f"A {vehicle} travels at a steady {speed} km/h. "
        f"How many minutes does it take to cover {distance} km?"
    )
    steps = [
        f"Time = {distance} / {speed} hours = {distance} {TIMES} 60 / {speed} minutes.",
        f"{distance} {TIMES} 60 = {distance * 60}, and {distance * 60} / {speed} = {minutes}.",
    ]
    return prompt, steps, minutes


def _distance(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    h1, h2 = rng.randint(1, 4), rng.randint(1, 3)
    v1, v2 = rng.choice(SPEEDS), rng.choice(SPEEDS)
    d1, d2 = h1 * v1, h2 * v2
    prompt = (
        f"{name} drives for {h1} hours at {v1} km/h, then for {h2} more hours at {v2} km/h. "
        "How many kilometres does the whole trip cover?"
    )
    steps = [
        f"First part: {h1} {TIMES} {v1} = {d1} km.",
        f"Second part: {h2} {TIMES} {v2} = {d2} km.",
        f"Whole trip: {d1} + {d2} = {d1 + d2} km.",
    ]
    return prompt, steps, d1 + d2


def _recipe(rng: random.Random) -> tuple[str, list[str], int]:
    ingredient, unit = rng.choice(INGREDIENTS)
    per_person = rng.choice((15, 20, 25, 30, 40, 50, 60, 75, 80, 100, 120, 150))
    serves, wanted = rng.sample((2, 3, 4, 5, 6, 8, 10, 12), 2)
    amount = per_person * serves
    prompt = (
        f"A recipe for {serves} people uses {amount} {unit} of {ingredient}. "
        f"How many {unit} of {ingredient} are needed to make it for {wanted} people?"
    )
    steps = [
        f"Per person: {amount} / {serves} = {per_person} {unit}.",
        f"For {wanted} people: {per_person} {TIMES} {wanted} = {per_person * wanted} {unit}.",
    ]
    return prompt, steps, per_person * wanted


def _ages_sum(rng: random.Random) -> tuple[str, list[str], int]:
    older, younger = rng.sample(NAMES, 2)
    age, gap, years = rng.randint(3, 40), rng.randint(1, 12), rng.randint(2, 10)
    total = 2 * age + gap + 2 * years
    prompt = (
        f"{older} is {gap} years older than {younger}. In {years} years, their ages will add "
        f"up to {total}. How old is {younger} now?"
    )
    now = total - 2 * years
    steps = [
        f"Each will be {years} years older, so now their ages add up to "
        f"{total} - {2 * years} = {now}.",
        f"Without the gap: {now} - {gap} = {now - gap}, which is twice {younger}'s age.",
        f"{younger} is {now - gap} / 2 = {age}.",
    ]
    return prompt, steps, age


def _ages_times(rng: random.Random) -> tuple[str, list[str], int]:
    child = rng.choice(NAMES)
    age, times = rng.randint(2, 15), rng.randint(2, 5)
    ago = rng.randint(1, age - 1) if age > 2 else 1
    parent_age = age * times
    prompt = (
        f"{child}'s aunt is {times} times as old as {child}, who is {age}. "
        f"How old was the aunt {ago} years ago?"
    )
    steps = [
        f"The aunt is {times} {TIMES} {age} = {parent_age} now.",
        f"{ago} years ago she was {parent_age} - {ago} = {parent_age - ago}.",
    ]
    return prompt, steps, parent_age - ago


def _area(rng: random.Random) -> tuple[str, list[str], int]:
    length, width = rng.randint(6, 30), rng.randint(4, 20)
    shed_l, shed_w = rng.randint(1, 4), rng.randint(1, 3)
    garden, shed = length * width, shed_l * shed_w
    prompt = (
        f"A rectangular garden is {length} m long and {width} m wide. A {shed_l} m by {shed_w} m "
        "shed stands on it. How many square metres of the garden are left for grass?"
    )
    steps = [
        f"Garden: {length} {TIMES} {width} = {garden} square metres.",
        f"Shed: {shed_l} {TIMES} {shed_w} = {shed} square metres.",
        f"Grass: {garden} - {shed} = {garden - shed} square metres.",
    ]
    return prompt, steps, garden - shed


def _tiles(rng: random.Random) -> tuple[str, list[str], int]:
    per_box = rng.choice((2, 3, 4, 5, 6))
    boxes = rng.randint(3, 25)
    area = per_box * boxes
    width = next(w for w in (4, 3, 5, 2, 6, 1) if area % w == 0)
    length = area // width
    prompt = (
        f"A floor measures {length} m by {width} m. One box of tiles covers {per_box} square "
        "metres. How many boxes are needed to tile the whole floor exactly?"
    )
    steps = [
        f"Floor: {length} {TIMES} {width} = {area} square metres.",
        f"Boxes: {area} / {per_box} = {boxes}.",
    ]
    return prompt, steps, boxes


def _savings(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    start, weekly, weeks = rng.randint(0, 30) * 5, rng.randint(2, 12) * 5, rng.randint(3, 20)
    goal = start + weekly * weeks
    prompt = (
        f"{name} has ${start} saved and puts away ${weekly} every week. "
        f"After how many weeks will {name} have exactly ${goal}?"
    )
    steps = [
        f"Still needed: {goal} - {start} = {goal - start} dollars.",
        f"Weeks: {goal - start} / {weekly} = {weeks}.",
    ]
    return prompt, steps, weeks


def _shared_bill(rng: random.Random) -> tuple[str, list[str], int]:
    people, share = rng.randint(2, 8), rng.randint(8, 45)
    total = people * share
    tip = rng.randint(1, min(total // 3, 40) // people) * people
    meal = total - tip
    prompt = (
        f"{people} friends share a ${meal} dinner bill and a ${tip} tip equally. "
        "How many dollars does each friend pay?"
    )
    steps = [
        f"Together they pay {meal} + {tip} = {total} dollars.",
        f"Each pays {total} / {people} = {share} dollars.",
    ]
    return prompt, steps, share


Template = Callable[[random.Random], tuple[str, list[str], int]]
TEMPLATES: dict[str, Template] = {
    "shopping": _shopping,
    "change": _change,
    "travel_time": _travel_time,
    "distance": _distance,
    "recipe": _recipe,
    "ages_sum": _ages_sum,
    "ages_times": _ages_times,
    "area": _area,
    "tiles": _tiles,
    "savings": _savings,
    "shared_bill": _shared_bill,
}


def arith_problems(
    count: int, seed: int, stream: str = "train", exclude: frozenset[str] = frozenset()
) -> list[ArithProblem]:
    """`count` distinct problems, cycling through the templates in a seeded order.

    `stream` names an independent draw for one seed ("train", "eval"); prompts in `exclude`
    (e.g. the training set's, when drawing an evaluation set) are skipped.

    Raises:
        ValueError: `count` distinct new prompts could not be drawn.
    """
    rng = random.Random(f"arith:{stream}:{seed}")
    names = list(TEMPLATES)
    problems: list[ArithProblem] = []
    seen = set(exclude)
    for attempt in range(count * 20):
        if attempt % len(names) == 0:
            rng.shuffle(names)
        name = names[attempt % len(names)]
        prompt, steps, answer = TEMPLATES[name](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        problems.append(ArithProblem(name, prompt, _worked(steps, answer), answer))
        if len(problems) == count:
            return problems
    raise ValueError(f"could not draw {count} distinct arithmetic problems")


# ----- scoring ------------------------------------------------------------------------------
_NUMBER = re.compile(
    r"^[\s*_]*[$€£]?\s*(?P<sign>[-\u2212]?)\s*[$€£]?\s*"
    r"(?P<digits>\d{1,3}(?:,\d{3})+|\d+)(?P<fraction>\.\d+)?(?![\d,]*\d)"
)
_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)


def parse_answer(text: str) -> int | None:
    """The integer after the last `Answer:` marker, or None.

    Case is ignored; a currency sign, markdown emphasis, thousands commas (`1,200`) and units
    or words after the number (`16 dollars.`) are tolerated, as is a zero fraction (`12.0`).
    No marker, nothing numeric right after the last one, or a fraction (`12.5`) gives None:
    the fixed format is part of the skill, so a number elsewhere in the text earns nothing.
    """
    markers = list(_MARKER.finditer(text))
    if not markers:
        return None
    line = text[markers[-1].end() :].split("\n", 1)[0]
    match = _NUMBER.match(line)
    if match is None:
        return None
    fraction = match["fraction"]
    if fraction is not None and fraction.strip(".0"):
        return None
    value = int(match["digits"].replace(",", ""))
    return -value if match["sign"] else value


def score_arith(problems: Sequence[ArithProblem], answers: Sequence[str]) -> float:
    """Share of answers whose `Answer:` integer equals the problem's (0.0 for no problems).

    Raises:
        ValueError: the two sequences differ in length.
    """
    if len(problems) != len(answers):
        raise ValueError(f"{len(problems)} problems but {len(answers)} answers")
    if not problems:
        return 0.0
    right = sum(parse_answer(text) == p.answer for p, text in zip(problems, answers, strict=True))
    return right / len(problems)


# ----- files --------------------------------------------------------------------------------
def arith_row(problem: ArithProblem) -> dict[str, Any]:
    """A chat row for `safesteer finetune`; `answer` and `template` are ignored by training."""
    return {
        "messages": [
            {"role": "user", "content": problem.prompt},
            {"role": "assistant", "content": problem.solution},
        ],
        "answer": problem.answer,
        "template": problem.template,
    }


def load_arith_file(path: Path) -> list[ArithProblem]:
    """Read problems back from rows written by `arith_row` (e.g. `arith_eval.jsonl`).

    Raises:
        ValueError: a row lacks the user prompt, the reference answer or the integer.
    """
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            user, assistant = row["messages"][0], row["messages"][1]
            answer = row["answer"]
            if not isinstance(answer, int) or isinstance(answer, bool):
                raise TypeError("answer")
            problem = ArithProblem(
                str(row.get("template", "")), user["content"], assistant["content"], answer
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{path.name} line {number}: not an arithmetic row") from exc
        problems.append(problem)
    return problems
