"""The offline sample (licence CC0-1.0, written by this project): short templated questions whose answers state one
checkable fact.

Split by fact, not by row: a held-out country, antonym pair, month or number never occurs in train, so the test
split asks for facts the model was not shown and measures whether fine-tuning transferred a skill. Every answer is
one sentence whose only words absent from its question are the fact, so it can be checked.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from phi3flow.data.schema import DataError, Row, make_row

SAMPLE_LICENSE = "CC0-1.0"


CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Mexico": "Mexico City",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "India": "New Delhi",
    "China": "Beijing",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Switzerland": "Bern",
    "Russia": "Moscow",
    "Ukraine": "Kyiv",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Cuba": "Havana",
    "Colombia": "Bogota",
    "Iceland": "Reykjavik",
    "New Zealand": "Wellington",
    "Czechia": "Prague",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Slovakia": "Bratislava",
    "Estonia": "Tallinn",
    "Latvia": "Riga",
    "Lithuania": "Vilnius",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Malaysia": "Kuala Lumpur",
    "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka",
    "Nepal": "Kathmandu",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh",
    "Jordan": "Amman",
    "Lebanon": "Beirut",
    "Ethiopia": "Addis Ababa",
    "Ghana": "Accra",
    "Senegal": "Dakar",
    "Uganda": "Kampala",
    "Venezuela": "Caracas",
    "Ecuador": "Quito",
    "Uruguay": "Montevideo",
    "Jamaica": "Kingston",
    "Afghanistan": "Kabul",
    "Qatar": "Doha",
    "Mongolia": "Ulaanbaatar",
}
# Pairs share no word, so holding out a pair holds out both of its words.
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "strong": "weak",
    "open": "closed",
    "full": "empty",
    "high": "low",
    "young": "old",
    "rich": "poor",
    "hard": "soft",
    "wet": "dry",
    "loud": "quiet",
    "thick": "thin",
    "near": "far",
    "clean": "dirty",
    "long": "short",
    "up": "down",
    "inside": "outside",
    "true": "false",
    "win": "lose",
    "buy": "sell",
    "push": "pull",
    "begin": "end",
    "cheap": "expensive",
    "love": "hate",
    "north": "south",
    "east": "west",
    "sweet": "sour",
    "wide": "narrow",
    "deep": "shallow",
    "arrive": "depart",
    "remember": "forget",
    "increase": "decrease",
    "smooth": "rough",
    "ancient": "modern",
    "guilty": "innocent",
    "friend": "enemy",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
# Operands and results: train numbers are at most 30, held-out ones at least 31.
TRAIN_OPERANDS = range(2, 16)
TEST_ADDENDS = range(31, 61)
TEST_MINUENDS, TEST_SUBTRAHENDS = range(75, 100), range(31, 41)
HELD_OUT = ("countries", "antonym pairs")  # the families whose held-out facts the seed picks

Conversation = list[dict[str, str]]


def _turn(question: str, answer: str) -> Conversation:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _capital_rows(countries: list[str], rng: random.Random) -> list[Conversation]:
    found = []
    for country in countries:
        answer = f"The capital of {country} is {CAPITALS[country]}."
        found += [
            _turn(f"What is the capital of {country}?", answer),
            _turn(f"Which city is the capital of {country}?", answer),
            _turn(f"Tell me what the capital of {country} is.", answer),
        ]
        # multi-turn: the loss must cover every assistant turn, not only the last; both facts on the same side
        other = rng.choice([c for c in countries if c != country])
        found.append(
            _turn(f"Do you know what the capital of {country} is?", answer)
            + _turn(f"And the capital of {other}?", f"The capital of {other} is {CAPITALS[other]}.")
        )
    return found


def _opposite_rows(pairs: list[tuple[str, str]]) -> list[Conversation]:
    found = []
    for pair in pairs:
        for word, opposite in (pair, pair[::-1]):
            answer = f'The opposite of "{word}" is "{opposite}".'
            found += [
                _turn(f'What is the opposite of "{word}"?', answer),
                _turn(f'Which word is the opposite of "{word}"?', answer),
            ]
    return found


def _sequence_rows(names: list[str], unit: str) -> list[Conversation]:
    found = []
    for i, name in enumerate(names):
        for relation, other in (("after", names[(i + 1) % len(names)]), ("before", names[i - 1])):
            found.append(_turn(f"What is the {unit} {relation} {name}?", f"The {unit} {relation} {name} is {other}."))
    return found


def _arithmetic_rows(sums: Iterable[tuple[int, int]], differences: Iterable[tuple[int, int]]) -> list[Conversation]:
    """A result equal to an operand is left out: an answer repeating the question would contain it."""
    found = [_turn(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in sums]
    return found + [_turn(f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.") for a, b in differences if a - b not in (a, b)]


def sample_pools(seed: int, test_size: float = 0.2) -> tuple[list[Conversation], list[Conversation]]:
    """Every conversation the sample can hold, by side: (train pool, test pool); the seed picks the held-out facts."""
    rng = random.Random(seed)
    countries, pairs = list(CAPITALS), list(OPPOSITES.items())
    test_countries = set(rng.sample(countries, max(2, round(len(countries) * test_size))))
    test_pairs = set(rng.sample(pairs, max(1, round(len(pairs) * test_size))))
    train = (
        _capital_rows([c for c in countries if c not in test_countries], rng)
        + _opposite_rows([p for p in pairs if p not in test_pairs])
        + _sequence_rows(DAYS, "day")
        + _arithmetic_rows(
            [(a, b) for a in TRAIN_OPERANDS for b in TRAIN_OPERANDS],
            [(a, b) for a in TRAIN_OPERANDS for b in TRAIN_OPERANDS if a > b],
        )
    )
    test = (
        _capital_rows(sorted(test_countries, key=countries.index), rng)
        + _opposite_rows(sorted(test_pairs, key=pairs.index))
        + _sequence_rows(MONTHS, "month")  # a skill shown on days, asked about months
        + _arithmetic_rows(
            [(a, b) for a in TEST_ADDENDS for b in TEST_ADDENDS], [(a, b) for a in TEST_MINUENDS for b in TEST_SUBTRAHENDS]
        )
    )
    return train, test


def _pick(pool: list[Conversation], size: int, rng: random.Random) -> list[Conversation]:
    """`size` conversations with each family's share of the non-arithmetic pool kept, arithmetic filling the rest."""
    words = [c for c in pool if " plus " not in c[0]["content"] and " minus " not in c[0]["content"]]
    numbers = [c for c in pool if c not in words]
    n_words = min(len(words), round(size * 0.6))
    if size - n_words > len(numbers):
        raise DataError(f"the sample size is too large: {size} rows on one side, the templates give {len(pool)}")
    return rng.sample(words, n_words) + rng.sample(numbers, size - n_words)


def sample_split(size: int = 400, test_size: float = 0.2, seed: int = 42) -> tuple[list[Row], list[Row]]:
    """The offline sample, split by fact: (train rows, test rows), `size` distinct conversations in all, shuffled."""
    if not 0 < test_size < 1:
        raise DataError(f"test size must be between 0 and 1, got {test_size}")
    if size < 2:
        raise DataError(f"the sample size must be at least 2, got {size}")
    rng = random.Random(seed)
    train_pool, test_pool = sample_pools(seed, test_size)
    n_test = max(1, round(size * test_size))
    train, test = _pick(train_pool, size - n_test, rng), _pick(test_pool, n_test, rng)
    rng.shuffle(train)
    rng.shuffle(test)
    return [make_row(m) for m in train], [make_row(m) for m in test]


def sample_rows(size: int = 400, seed: int = 42) -> list[Row]:
    """The whole offline sample (train rows, then test rows)."""
    train, test = sample_split(size, seed=seed)
    return train + test
