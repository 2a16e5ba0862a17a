"""The `toolchoice` environment: typed queries, four tools that really try to answer them,
shaped rewards, one episode of the game, and deterministic training data.

Each query is a short text ("what is 17 * 23", "capital of France?", "convert 12 km to miles",
"reverse the word 'apple'"), and four little tools actually try to answer it — a calculator
that parses arithmetic, a lookup table of facts, a unit converter and a text tool. A wrong tool
gives no answer, or (the calculator, which falls back to the first number it sees) a wrong one.
One more action, `answer`, submits the latest tool result and ends the episode. An episode is
at most `max_steps` actions.

Rewards are shaped: +0.1 the first time the expected tool is used (only the first, so calling
it again pays nothing), -0.01 per step, +1 when the submitted answer matches
`expected_outcome`. Whatever the policy (`toolchoice`'s linear one, `toolchoice-torch`'s
network), the environment is this one.
"""

from __future__ import annotations

import math
import random
import re
import threading
import zlib
from collections.abc import Callable
from typing import Any

from ..spec import TrainingQuery
from .base import Trajectory

__all__ = ["ACTIONS", "ANSWER", "CONTEXTS", "CORRECT_TOOL_BONUS", "FACTS", "NO_RESULT",
           "REWARD_SCALE",
           "OUTCOME_REWARD", "RESULT", "START", "STEP_PENALTY", "TOOLS", "answer_matches",
           "make_training_data", "play_episode", "query_features", "run_tool", "sample_action"]

TOOLS = ("calculator", "lookup", "converter", "text")
ANSWER = len(TOOLS)
ACTIONS = (*TOOLS, "answer")

# Contexts the policy conditions on, besides the query: what the last tool call gave.
START, RESULT, NO_RESULT = 0, 1, 2
CONTEXTS = 3

CORRECT_TOOL_BONUS = 0.1
STEP_PENALTY = 0.01
OUTCOME_REWARD = 1.0
REWARD_SCALE = (
    f"+{OUTCOME_REWARD:g} for a correct answer, +{CORRECT_TOOL_BONUS:g} for using the expected "
    f"tool, -{STEP_PENALTY:g} per step: at best "
    f"{OUTCOME_REWARD + CORRECT_TOOL_BONUS - 2 * STEP_PENALTY:.2f} (the tool, then the answer), "
    f"not 1")
"""What a trajectory's reward means, for displays beside an average reward."""


# --- The environment: tools that really try to answer the query text -------------------------

_NUMBER = r"\d+(?:\.\d+)?"
_ARITHMETIC = re.compile(rf"({_NUMBER})\s*(\+|-|\*|/|plus|minus|times)\s*({_NUMBER})")
_CONVERSION = re.compile(rf"({_NUMBER})\s*([a-z]+)\s+(?:in|to|into)\s+([a-z]+)")
_QUOTED = re.compile(r"'([^']*)'")

_COUNTRIES = {
    # country: (capital, currency)
    "france": ("paris", "euro"), "japan": ("tokyo", "yen"), "brazil": ("brasilia", "real"),
    "canada": ("ottawa", "dollar"), "india": ("new delhi", "rupee"), "kenya": ("nairobi",
    "shilling"), "mexico": ("mexico city", "peso"), "egypt": ("cairo", "pound"),
    "norway": ("oslo", "krone"), "peru": ("lima", "sol"), "poland": ("warsaw", "zloty"),
    "china": ("beijing", "yuan"), "russia": ("moscow", "ruble"), "thailand": ("bangkok",
    "baht"), "vietnam": ("hanoi", "dong"), "sweden": ("stockholm", "krona"),
}
FACTS: dict[tuple[str, str], str] = {
    (relation, country): value
    for country, values in _COUNTRIES.items()
    for relation, value in zip(("capital", "currency"), values)}

_UNIT_ALIASES = {"km": "km", "kilometers": "km", "mile": "miles", "miles": "miles",
                 "kg": "kg", "kilograms": "kg", "lb": "lb", "pounds": "lb",
                 "m": "m", "meters": "m", "ft": "ft", "feet": "ft",
                 "celsius": "celsius", "fahrenheit": "fahrenheit"}
_CONVERSIONS = {
    ("km", "miles"): lambda x: x * 0.621371, ("miles", "km"): lambda x: x / 0.621371,
    ("kg", "lb"): lambda x: x * 2.20462, ("lb", "kg"): lambda x: x / 2.20462,
    ("m", "ft"): lambda x: x * 3.28084, ("ft", "m"): lambda x: x / 3.28084,
    ("celsius", "fahrenheit"): lambda x: x * 9 / 5 + 32,
    ("fahrenheit", "celsius"): lambda x: (x - 32) * 5 / 9,
}


def _format_number(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return f"{value:.2f}"


def _calculator(text: str) -> str | None:
    """Evaluate `a op b`; else fall back to the first number (a plausible but wrong answer)."""
    match = _ARITHMETIC.search(text)
    if match:
        a, op, b = float(match.group(1)), match.group(2), float(match.group(3))
        if op in ("+", "plus"):
            return _format_number(a + b)
        if op in ("-", "minus"):
            return _format_number(a - b)
        if op in ("*", "times"):
            return _format_number(a * b)
        return _format_number(a / b) if b else None
    number = re.search(_NUMBER, text)
    return _format_number(float(number.group(0))) if number else None


def _lookup(text: str) -> str | None:
    relation = ("capital" if "capital" in text else
                "currency" if "currency" in text or "money" in text else None)
    if relation is None:
        return None
    for country in _COUNTRIES:
        if re.search(rf"\b{country}\b", text):
            return FACTS[relation, country]
    return None


def _converter(text: str) -> str | None:
    match = _CONVERSION.search(text)
    if not match:
        return None
    source = _UNIT_ALIASES.get(match.group(2))
    target = _UNIT_ALIASES.get(match.group(3))
    convert = _CONVERSIONS.get((source, target)) if source and target else None
    return f"{convert(float(match.group(1))):.2f}" if convert else None


def _text_tool(text: str) -> str | None:
    match = _QUOTED.search(text)
    if not match:
        return None
    word = match.group(1)
    if "reverse" in text or "backwards" in text:
        return word[::-1]
    if "uppercase" in text or "capitals" in text:
        return word.upper()
    if "letters" in text or "length" in text:
        return str(len(word))
    return None


_TOOL_FUNCTIONS = {"calculator": _calculator, "lookup": _lookup, "converter": _converter,
                   "text": _text_tool}


def run_tool(tool: str, query: str) -> str | None:
    """Run one tool on a query's text: its answer, or None when it cannot answer."""
    return _TOOL_FUNCTIONS[tool](query.lower())


def answer_matches(answer: str | None, expected: dict[str, Any], tool: str | None) -> bool:
    """Whether an answer (given by `tool`) satisfies an expected outcome.

    The answer must equal `expected["answer"]` (numbers compare as numbers, text ignoring case
    and surrounding space) when given, and come from `expected["tool"]` when given. An outcome
    that names neither cannot be checked, so nothing satisfies it.
    """
    if answer is None or ("answer" not in expected and "tool" not in expected):
        return False
    if "tool" in expected and expected["tool"] != tool:
        return False
    if "answer" not in expected:
        return True
    want, got = str(expected["answer"]).strip().lower(), answer.strip().lower()
    try:
        return math.isclose(float(want), float(got), rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return want == got


# --- What the policy sees of a query -----------------------------------------------------------


_TOKEN = re.compile(rf"{_NUMBER}|[a-z]+|[^\sa-z\d]")


def query_features(query: str, buckets: int) -> list[int]:
    """Sorted distinct feature indices of a query: hashed words, `<num>`, and a bias.

    crc32, not `hash`, so features are the same in every process.
    """
    tokens = {"<num>" if t[0].isdigit() else t for t in _TOKEN.findall(query.lower())}
    tokens.add("<bias>")
    return sorted({zlib.crc32(t.encode()) % buckets for t in tokens})


# --- One episode -------------------------------------------------------------------------------


def play_episode(query: TrainingQuery, features: list[int],
                 probabilities_in: Callable[[int], list[float]], *, tokens_per_step: int,
                 usd_per_1k_tokens: float, rng: random.Random, max_steps: int,
                 cancelled: threading.Event) -> Trajectory:
    """One episode of the environment, whatever the policy: `probabilities_in(context)` gives
    the action probabilities in a context; rewards as in the module docstring.

    `data` keeps what an update needs (features, contexts, actions, step rewards) as plain
    builtins.

    Raises:
        InterruptedError: `cancelled` was set before a step.
    """
    expected_tool = _expected_tool(query)
    context, observation, last_tool = START, None, None
    contexts: list[int] = []
    actions: list[int] = []
    rewards: list[float] = []
    bonus_paid = success = False
    for _ in range(max_steps):
        if cancelled.is_set():
            raise InterruptedError("rollout cancelled")
        action = sample_action(probabilities_in(context), rng)
        contexts.append(context)
        actions.append(action)
        reward = -STEP_PENALTY
        if action == ANSWER:
            success = answer_matches(observation, query.expected_outcome, last_tool)
            rewards.append(reward + (OUTCOME_REWARD if success else 0.0))
            break
        tool = TOOLS[action]
        if tool == expected_tool and not bonus_paid:
            reward += CORRECT_TOOL_BONUS
            bonus_paid = True
        observation, last_tool = run_tool(tool, query.query), tool
        context = RESULT if observation is not None else NO_RESULT
        rewards.append(reward)
    steps = len(actions)
    tokens = steps * tokens_per_step
    return Trajectory(
        reward=sum(rewards), success=success, steps=steps, tokens=tokens,
        cost_usd=tokens / 1000.0 * usd_per_1k_tokens,
        data={"features": features, "contexts": contexts, "actions": actions,
              "rewards": rewards})


def sample_action(probabilities: list[float], rng: random.Random) -> int:
    """An action drawn from `probabilities` with one draw of `rng`."""
    u = rng.random()
    cumulative = 0.0
    for action, p in enumerate(probabilities):
        cumulative += p
        if u < cumulative:
            return action
    return len(probabilities) - 1


def _expected_tool(query: TrainingQuery) -> str | None:
    tool = query.expected_outcome.get("tool")
    return tool if isinstance(tool, str) else None


# --- Training data -----------------------------------------------------------------------------

_WORDS = ("apple", "river", "planet", "garden", "silver", "rocket", "window", "forest",
          "puzzle", "candle", "tiger", "orange", "bridge", "marble", "shadow", "violin")


def make_training_data(n: int, seed: int, *, distinct: bool = False) -> list[TrainingQuery]:
    """`n` typed queries with expected outcomes, deterministic from `seed`; with `distinct`,
    only the first of the queries that share a text (fewer than `n` then): a held-out split
    of data with repeats would score on queries it trains on, which `validate_spec` refuses.

    Kinds come round-robin (arithmetic, lookup, conversion, text), each phrased by one of a few
    templates. Templates share words across kinds ("what is", "in", "of") so the policy must
    learn which words matter, and within a kind they share a marker ("capital", "currency",
    "the word", numbers with units), so a phrasing missing from a small training split is
    still recognisable. Answers are computed here, independently of the tools.
    """
    rng = random.Random(seed)
    kinds = ("arithmetic", "lookup", "conversion", "text")
    queries = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "arithmetic":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            op, symbol = rng.choice([("+", "+"), ("-", "-"), ("*", "*"), ("+", "plus"),
                                     ("-", "minus"), ("*", "times")])
            value = a + b if op == "+" else a - b if op == "-" else a * b
            template = rng.choice(["what is {a} {op} {b}", "compute {a} {op} {b}",
                                   "calculate {a} {op} {b}"])
            text, tool, answer = template.format(a=a, op=symbol, b=b), "calculator", str(value)
        elif kind == "lookup":
            country = rng.choice(sorted(_COUNTRIES))
            capital, currency = _COUNTRIES[country]
            template, answer = rng.choice([
                ("what is the capital of {c}", capital), ("capital of {c}?", capital),
                ("what is the currency of {c}", currency),
                ("which currency is used in {c}", currency)])
            text, tool = template.format(c=country.title()), "lookup"
        elif kind == "conversion":
            (source, target), convert = rng.choice(sorted(_CONVERSIONS.items(),
                                                          key=lambda kv: kv[0]))
            x = rng.randint(1, 200)
            template = rng.choice(["convert {x} {s} to {t}", "{x} {s} in {t}",
                                   "what is {x} {s} in {t}"])
            text = template.format(x=x, s=source, t=target)
            tool, answer = "converter", f"{convert(float(x)):.2f}"
        else:
            word = rng.choice(_WORDS)
            template, answer = rng.choice([
                ("reverse the word '{w}'", word[::-1]),
                ("uppercase the word '{w}'", word.upper()),
                ("how many letters are in the word '{w}'", str(len(word)))])
            text, tool = template.format(w=word), "text"
        queries.append(TrainingQuery(query=text, kind=kind,
                                     expected_outcome={"tool": tool, "answer": answer}))
    if distinct:
        first = {q.query: i for i, q in reversed(list(enumerate(queries)))}
        return [q for i, q in enumerate(queries) if first[q.query] == i]
    return queries
