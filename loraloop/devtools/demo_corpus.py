"""The demo world's corpus: questions answered in styles that vary along four attributes.

Every reply has a *style*, one value per attribute:

    tone    friendly | formal | neutral
    length  short (one piece of advice) | long (three)
    format  prose | list (one "- " bullet per piece of advice)
    emoji   yes | no

A dialogue may start with a system (control) line that asks for any subset of the
attributes, e.g. `system: Be formal and polite. Use emoji.`; the attributes it leaves out
are drawn from the base mix (`BASE_MIX`), which is also the model's behaviour with no
system line at all. So a system-prompt arm can pin some attributes (the bandit's arms
pin one each) while every combination still occurs in the corpus, and the full
control line of a style (`control_line`) is the oracle's prompt.

Deterministic from a seed; nothing here reads or scores model outputs (that is
`loraloop.demo_world`, which only looks at the text).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "tone": ("friendly", "formal", "neutral"),
    "length": ("short", "long"),
    "format": ("prose", "list"),
    "emoji": ("no", "yes"),
}

# What the model does about an attribute nobody asked for (probabilities per value).
BASE_MIX: dict[str, dict[str, float]] = {
    "tone": {"friendly": 1 / 3, "formal": 1 / 3, "neutral": 1 / 3},
    "length": {"short": 0.5, "long": 0.5},
    "format": {"prose": 0.7, "list": 0.3},
    "emoji": {"no": 0.7, "yes": 0.3},
}

# The system-line sentence that asks for each attribute value, in this fixed order.
CONTROL: dict[str, dict[str, str]] = {
    "tone": {
        "friendly": "Be warm and friendly.",
        "formal": "Be formal and polite.",
        "neutral": "Be plain and neutral.",
    },
    "length": {"short": "Keep it short.", "long": "Give a detailed answer."},
    "format": {"prose": "Answer in sentences.", "list": "Answer as a list."},
    "emoji": {"no": "Do not use emoji.", "yes": "Use emoji."},
}

Style = dict[str, str]


def control_line(style: Mapping[str, str]) -> str:
    """The system prompt asking for these attribute values (any subset of the attributes)."""
    return " ".join(CONTROL[a][style[a]] for a in ATTRIBUTES if a in style)


# fmt: off
TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "things": [
            "soup", "bread", "rice", "pasta", "curry", "salad", "pancakes", "an omelette",
            "stew", "pizza", "noodles", "a chocolate cake", "cookies", "tomato sauce",
            "dumplings", "roast chicken", "risotto", "banana bread", "tacos", "grilled fish",
        ],
        "questions": [
            "How do I make better {thing}?", "What is the secret to good {thing}?",
            "How do I cook {thing}?", "Can you suggest a simple way to make {thing}?",
            "Why does my {thing} taste bland?", "Any tips for {thing}?",
        ],
        "advice": [
            "add a pinch of salt early", "use fresh herbs", "let it rest for ten minutes",
            "cook it slowly on low heat", "taste it as you go", "toast the spices first",
            "use a little olive oil", "stir it gently", "keep the lid on the pot",
            "add a squeeze of lemon at the end", "weigh the flour instead of using cups",
            "preheat the oven properly", "season it with garlic and pepper",
            "serve it while it is warm", "chop the onions very finely",
        ],
        "emoji": ["🍝", "🍲", "😋"],
    },
    "travel": {
        "things": [
            "Paris", "Tokyo", "Lisbon", "Rome", "Berlin", "Madrid", "Prague", "Vienna",
            "Istanbul", "Kyoto", "Barcelona", "London", "Dublin", "Seoul", "Cairo", "Sydney",
            "Iceland", "the mountains", "the coast", "a small island",
        ],
        "questions": [
            "What should I see in {thing}?", "When is the best time to visit {thing}?",
            "How can I save money on a trip to {thing}?", "What should I pack for {thing}?",
            "Any tips for a trip to {thing}?", "How do I get around in {thing}?",
        ],
        "advice": [
            "book the train tickets early", "walk around the old town", "pack light",
            "visit the museums in the morning", "try the local food markets",
            "travel in spring or autumn", "buy a travel pass for the metro",
            "learn a few words of the language", "carry a small umbrella",
            "stay near the city centre", "avoid the busy summer weeks",
            "keep a copy of your passport", "take the night bus to save money",
            "ask the locals for advice", "plan one quiet day to rest",
        ],
        "emoji": ["✈️", "🌍", "🧳"],
    },
    "sport": {
        "things": [
            "running", "football", "tennis", "swimming", "cycling", "basketball", "yoga",
            "climbing", "skiing", "rowing", "boxing", "hiking", "golf", "a marathon",
            "strength training", "surfing",
        ],
        "questions": [
            "How do I get better at {thing}?", "How often should I train for {thing}?",
            "What do I need to start {thing}?", "How can I avoid injuries in {thing}?",
            "Is {thing} good for beginners?", "Any tips for {thing}?",
        ],
        "advice": [
            "warm up for ten minutes", "train three times a week", "rest between sessions",
            "drink enough water", "start slowly and build up", "work on your technique",
            "find a coach or a club", "sleep at least eight hours",
            "stretch after every session", "keep a training diary", "wear good shoes",
            "set a small goal each month", "eat a light meal two hours before",
            "listen to your body", "practice with a friend",
        ],
        "emoji": ["💪", "🏃", "⚽"],
    },
    "music": {
        "things": [
            "the guitar", "the piano", "the violin", "the drums", "singing", "jazz",
            "the cello", "the flute", "music theory", "songwriting", "the bass",
            "the saxophone", "the ukulele", "reading sheet music", "a new song",
        ],
        "questions": [
            "How do I learn {thing}?", "How much should I practice {thing}?",
            "What is a good way to start with {thing}?", "Why is {thing} so hard for me?",
            "Can you recommend a plan for {thing}?", "Any tips for {thing}?",
        ],
        "advice": [
            "practice a little every day", "use a metronome", "learn the major scales",
            "play slowly before you play fast", "record yourself and listen back",
            "learn songs you really enjoy", "take a few lessons with a teacher",
            "focus on one piece at a time", "listen to great players",
            "keep your hands relaxed", "play with other musicians",
            "write down what you practice", "count the rhythm out loud",
            "tune your instrument before every session", "take short breaks",
        ],
        "emoji": ["🎵", "🎸", "🎹"],
    },
    "code": {
        "things": [
            "Python", "Rust", "JavaScript", "Go", "SQL", "a web server", "unit tests",
            "recursion", "git", "a REST API", "a database schema", "error handling",
            "async code", "a command line tool", "regular expressions", "Docker",
        ],
        "questions": [
            "How do I get started with {thing}?", "What is the best way to write {thing}?",
            "How do I debug {thing}?", "Why is my {thing} so slow?",
            "Can you explain {thing} simply?", "Any tips for {thing}?",
        ],
        "advice": [
            "write small functions", "add a test for every bug",
            "read the error message carefully", "use a debugger",
            "keep the code simple", "measure before you optimise",
            "name your variables clearly", "commit your work often",
            "read the official documentation", "handle errors where they happen",
            "avoid global state", "use a profiler to find the slow part",
            "split the problem into steps", "review your own code the next day",
            "check the types of your inputs",
        ],
        "emoji": ["💻", "🐍", "🚀"],
    },
}

# Openers, the lead-in of each piece of advice, and closers, per tone. Friendly replies
# exclaim; formal ones use set phrases; neutral ones are bare instructions.
_OPENERS = {
    "friendly": ["Great question!", "Happy to help!", "Oh, I love {thing}!", "Sure thing!"],
    "formal": [
        "Certainly.", "Thank you for your question.", "Regarding {thing}, here is my advice.",
    ],
    "neutral": ["", "For {thing}:"],
}
_LEADS = {  # prose sentences, by position of the piece of advice
    "friendly": [["Just {a}!", "Try to {a}!"], ["Also, {a}!", "And {a}!"], ["Oh, and {a}!"]],
    "formal": [["It is advisable to {a}."], ["Furthermore, one should {a}."],
               ["Moreover, it is wise to {a}."]],
    "neutral": [["{A}."], ["{A}."], ["{A}."]],
}
_BULLETS = {  # list items
    "friendly": ["{A}!"], "formal": ["It is advisable to {a}."], "neutral": ["{A}."],
}
_CLOSERS = {
    "friendly": ["Have fun!", "You have got this!", "Enjoy!"],
    "formal": ["I trust this is helpful.", "Kind regards."],
    "neutral": [""],
}
# fmt: on


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def sample_style(rng: random.Random, fixed: Mapping[str, str] | None = None) -> Style:
    """A style with the `fixed` attributes as given and the rest drawn from `BASE_MIX`."""
    style: Style = {}
    for attr, mix in BASE_MIX.items():
        if fixed and attr in fixed:
            style[attr] = fixed[attr]
        else:
            values = list(mix)
            style[attr] = rng.choices(values, weights=[mix[v] for v in values])[0]
    return style


def render_reply(rng: random.Random, topic: str, thing: str, style: Mapping[str, str]) -> str:
    """One reply about `thing` in `style`."""
    t = TOPICS[topic]
    tone = style["tone"]
    n = 1 if style["length"] == "short" else 3
    advice = rng.sample(t["advice"], n)
    emoji = style["emoji"] == "yes"
    icon = rng.choice(t["emoji"])
    parts: list[str] = []
    opener = rng.choice(_OPENERS[tone]).format(thing=thing)
    if opener:
        parts.append(f"{opener} {icon}" if emoji and tone == "friendly" else opener)
    if style["format"] == "list":
        items = [rng.choice(_BULLETS[tone]).format(a=a, A=_cap(a)) for a in advice]
        body = [f"- {item}" for item in items]
    else:
        body = [rng.choice(_LEADS[tone][i]).format(a=a, A=_cap(a)) for i, a in enumerate(advice)]
    if emoji:
        body[-1] = f"{body[-1]} {icon}"
    closer = rng.choice(_CLOSERS[tone]) if n > 1 else ""
    sep = "\n" if style["format"] == "list" else " "
    text = sep.join([*parts, *body]) if parts else sep.join(body)
    if closer:
        text = f"{text}{sep}{closer}"
    return text


def sample_prompt(rng: random.Random) -> tuple[str, str, str]:
    """(topic, thing, question) of one user question."""
    topic = rng.choice(sorted(TOPICS))
    thing = rng.choice(TOPICS[topic]["things"])
    question = _cap(rng.choice(TOPICS[topic]["questions"]).format(thing=thing))
    return topic, thing, question


def dialogue(rng: random.Random) -> str:
    """One chat-formatted dialogue (`role: content` lines, as the tiny model's template).

    One in eight has no system line; the others ask for each attribute with probability
    one half (at least one), so full, partial and single-attribute control lines all occur.
    """
    topic, thing, question = sample_prompt(rng)
    asked: Style = {}
    if rng.random() >= 1 / 8:
        while not asked:
            # Values asked for evenly, not with the base mix, so rare ones get control lines.
            asked = {a: rng.choice(v) for a, v in ATTRIBUTES.items() if rng.random() < 0.5}
    style = sample_style(rng, asked)
    lines = [f"system: {control_line(asked)}"] if asked else []
    lines += [f"user: {question}", f"assistant: {render_reply(rng, topic, thing, style)}"]
    return "\n".join(lines)


def generate_corpus(seed: int = 0, n_lines: int = 4000) -> list[str]:
    """`n_lines` dialogues, deterministic from `seed`."""
    rng = random.Random(seed)
    return [dialogue(rng) for _ in range(n_lines)]


def corpus_sentences() -> set[str]:
    """Every sentence or bullet a reply of the corpus can contain (emoji left out)."""
    out: set[str] = set()
    for t in TOPICS.values():
        for opener in (o for tone in _OPENERS.values() for o in tone if o):
            out.update(opener.format(thing=thing) for thing in t["things"])
        for a in t["advice"]:
            for template in [
                *(x for tone in _LEADS.values() for pos in tone for x in pos),
                *(x for tone in _BULLETS.values() for x in tone),
            ]:
                out.add(template.format(a=a, A=_cap(a)))
    out.update(c for tone in _CLOSERS.values() for c in tone if c)
    return out
