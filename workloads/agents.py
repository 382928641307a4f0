"""Multi-agent pipelines over a shared fact sheet, with checkable answers.

Each agent has its own system prefix (reused across tasks as an exact prefix); the fact sheet, the
question and the other agents' replies are *shared* segments that recur in several agents' prompts
after different prefixes, which is what KVCOMM-style anchor reuse targets. Prompts are split into
:class:`Segment` s at newline boundaries so that tokenising the segments one by one and concatenating
the ids gives the same ids as tokenising the full prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from workloads import corpus as C

# kind -> (fact line, question); one attribute per fact sheet: mixing attributes confuses small models
_FACTS = {
    "age": ("{p} is {n} years old.", "How old is {p}?"),
    "city": ("{p} lives in {c}.", "In which city does {p} live?"),
    "count": ("{p} has {n} {unit}.", "How many {unit} does {p} have?"),
    "sum": ("{p} has {n} {unit}.", "How many {unit} do {p} and {q} have together?"),
    "difference": ("{p} has {n} {unit}.", "How many more {unit} does {p} have than {q}?"),
}
_UNITS = ("books", "coins", "plants", "shirts", "stamps", "candles")
_NOTES = (  # padding about the same people: no numbers, no cities, no units
    "{p} works as a {job}.", "{p} enjoys {hobby} on weekends.", "{p} rides a {colour} bicycle to work.",
    "{p} studied {field} at university.", "{p} drinks a cup of tea every morning.",
    "{p} is learning to play the piano.", "{p} often visits the {landmark} on Sundays.",
    "{p} is a close friend of {q}.", "{p} cooks dinner for the whole family on Fridays.",
    "{p} likes long walks in {season}.", "{p} is a little afraid of spiders.", "{p} wears a {colour} hat in winter.",
    "{p} writes long letters to an old school friend.", "{p} grows herbs on a sunny balcony.",
    "{p} sings in a small choir near the {landmark}.", "{p} prefers trains to planes.",
    "{p} never misses the morning news on the radio.", "{p} once got lost on a walk in the hills.",
)
TASK_KINDS = ("age", "city", "count", "sum", "difference")
DEFAULT_KINDS = ("age", "city", "count", "sum")


@dataclass(frozen=True)
class AgentTask:
    facts: str  # the fact sheet, one fact or note per line, ending with "\n"
    question: str
    answer: str
    aliases: tuple[str, ...] = ()
    kind: str = "lookup"


@dataclass(frozen=True)
class AgentSpec:
    name: str
    system_prompt: str


@dataclass(frozen=True)
class Pipeline:
    agents: tuple[AgentSpec, ...]
    topology: Literal["chain", "full"]


@dataclass(frozen=True)
class Segment:
    text: str
    kind: Literal["prefix", "shared", "own"]
    segment_id: str | None = None


@dataclass(frozen=True)
class ChatFormat:
    """Chat-template glue; the default is ChatML (SmolLM2, Qwen)."""

    system_open: str = "<|im_start|>system\n"
    user_open: str = "<|im_start|>user\n"
    assistant_open: str = "<|im_start|>assistant\n"
    turn_close: str = "<|im_end|>\n"


CHATML = ChatFormat()


# ---------------------------------------------------------------- tasks


@dataclass(frozen=True)
class _Sheet:
    kind: str
    people: list[str]
    values: list[int]
    cities: list[str]
    unit: str
    facts: str


def _sheet(rng: random.Random, fact_tokens: int, kinds: Sequence[str]) -> _Sheet:
    kind = rng.choice(list(kinds))
    if kind not in _FACTS:
        raise ValueError(f"unknown task kind {kind!r}; known: {TASK_KINDS}")
    line = _FACTS[kind][0]
    people = rng.sample(C.FIRST_NAMES, rng.randint(5, 7))
    values = rng.sample(range(21, 60) if kind == "age" else range(2, 25), len(people))  # distinct
    cities = rng.sample(C.CITIES, len(people))
    unit = rng.choice(_UNITS)
    facts = [line.format(p=p, n=v, c=c, unit=unit) for p, v, c in zip(people, values, cities, strict=True)]
    notes = [n.format(p=p, q=rng.choice([x for x in people if x != p]), job=rng.choice(C.JOBS),
                      hobby=rng.choice(C.HOBBIES), colour=rng.choice(C.COLOURS), field=rng.choice(C.FIELDS),
                      landmark=rng.choice(C.LANDMARKS), season=rng.choice(C.SEASONS))
             for n in _NOTES for p in people]
    rng.shuffle(notes)
    lines = list(facts)  # facts first, then notes: the small model finds them best this way
    budget = C.target_words(fact_tokens) - sum(C.words(f) for f in facts)
    while notes and budget > 0:
        lines.append(notes.pop())
        budget -= C.words(lines[-1])
    return _Sheet(kind, people, values, cities, unit, "".join(f"- {s}\n" for s in lines))


def _ask(rng: random.Random, sheet: _Sheet) -> AgentTask:
    people, values, cities, kind = sheet.people, sheet.values, sheet.cities, sheet.kind
    i, j = rng.sample(range(len(people)), 2)
    if kind == "difference" and values[i] < values[j]:
        i, j = j, i
    answer = {"age": str(values[i]), "city": cities[i], "count": str(values[i]), "sum": str(values[i] + values[j]),
              "difference": str(values[i] - values[j])}[kind]
    aliases = C.CITY_ALIASES.get(answer, ()) if kind == "city" else ()
    q = _FACTS[kind][1].format(p=people[i], q=people[j], unit=sheet.unit)
    return AgentTask(sheet.facts, q, answer, aliases, kind)


def make_agent_tasks(n: int, *, seed: int = 0, fact_tokens: int = 300, kinds: Sequence[str] = DEFAULT_KINDS,
                     sheets: int | None = None) -> list[AgentTask]:
    """``n`` tasks, each with a fact sheet of about ``fact_tokens`` tokens (at least its facts). With
    ``sheets``, the tasks ask new questions about a pool of that many recurring fact sheets (documents that
    come back across user requests), task ``i`` about sheet ``i % sheets``."""
    rng = random.Random(f"agent-tasks-{seed}")
    if sheets is None:
        return [_ask(rng, _sheet(rng, fact_tokens, kinds)) for _ in range(n)]
    if sheets < 1:
        raise ValueError("sheets must be at least 1")
    pool = [_sheet(rng, fact_tokens, kinds) for _ in range(sheets)]
    return [_ask(rng, pool[i % sheets]) for i in range(n)]


def check_answer(task: AgentTask, text: str) -> bool:
    """Normalised whole-word containment of the answer or an alias in ``text``."""
    return C.contains_answer(text, (task.answer, *task.aliases))


# ---------------------------------------------------------------- pipelines

# name -> (role instruction in the system prompt, per-turn instruction in the user turn)
# The small model follows "... with the fact from the fact sheet" best; "quote"/"copy" derail it.
ROLES: dict[str, tuple[str, str]] = {
    "Researcher": ("Your job is to find the fact in the fact sheet that answers the question.",
                   "Answer the question with the fact from the fact sheet."),
    "Planner": ("Your job is to say which facts answer the question and how to combine them.",
                "Say which fact from the fact sheet answers the question."),
    "Calculator": ("Your job is to work out the answer from the facts, adding or subtracting numbers "
                   "when the question asks for it.", "Work out the answer with the facts from the fact sheet."),
    "Checker": ("Your job is to check the answer of the previous assistant against the fact sheet and "
                "to correct it if it is wrong.", "Check the answer and give the correct fact from the fact sheet."),
}
FINAL_ROLE = ("Answerer", ("Your job is to give the final answer to the question in one short sentence.",
                           "Give the final answer with the fact from the fact sheet."))
_GUIDELINES = (
    "Read the whole fact sheet before you reply.", "Never invent numbers or names that are not in the facts.",
    "Keep your reply short and clear.", "Use the exact names that appear in the fact sheet.",
    "If two facts look similar, read them again and pick the one that matches the question.",
    "Do not repeat the question in your reply.", "Write plain sentences without tables or lists.",
    "Ignore notes that do not help to answer the question.",
    "When the question asks for a total, add the two numbers carefully.",
    "When the question asks how many more, subtract the smaller number from the larger one.",
    "The other assistants may make mistakes, so compare their messages with the facts.",
    "Be polite and friendly, but do not add greetings or small talk.",
    "Numbers in the fact sheet are exact and up to date.",
    "Each line of the fact sheet states one fact or one note.",
    "Your reply will be read by the next assistant in the team or by the user.",
    "If the facts are not enough to answer, say so in one sentence.",
    "Do not explain your own role or these instructions in the reply.",
    "Prefer digits over words when you write numbers.",
    "Always name the place, the team or the person that your answer is about.",
    "A manager is the person in charge of a warehouse, a farm, a shop or a team.",
    "The team works for a small company that keeps careful records of its sites.",
    "Accuracy matters more than speed, but long answers are not helpful.",
    "Check every number twice before you write it down.",
    "Do not change the spelling of names, even if they look unusual.",
    "Answer in English, even if a name comes from another language.",
    "Treat every question as independent from earlier questions.",
    "Do not mention the fact sheet line numbers or bullet points.",
    "A good reply can be understood without reading the question again.",
    "Avoid guessing: every number you write must come from the facts or from a simple sum.",
    "When you are unsure, prefer the fact that names the exact place in the question.",
    "Stay calm and factual, as a careful clerk would.",
    "Keep units such as boxes, cows, cakes and points in your answer.",
)


def _system_prompt(rng: random.Random, name: str, role: str, n_agents: int, tokens: int) -> str:
    head = f"You are the {name}, one of {n_agents} assistants that answer questions about a fact sheet. {role}"
    budget = C.target_words(tokens) - C.words(head)
    extra: list[str] = []
    for rule in rng.sample(_GUIDELINES, len(_GUIDELINES)):
        if budget <= 0:
            break
        extra.append(rule)
        budget -= C.words(rule)
    return " ".join([head, *extra])


def make_pipeline(num_agents: int, topology: Literal["chain", "full"] = "chain", *, seed: int = 0,
                  prefix_tokens: int | Sequence[int] = (320, 120, 240, 400, 60)) -> Pipeline:
    """``num_agents`` (2-5) agents: seeded roles, then a final Answerer. Agent ``i`` gets a system
    prompt of about ``prefix_tokens[i % len(prefix_tokens)]`` tokens (or ``prefix_tokens``)."""
    if not 2 <= num_agents <= 5:
        raise ValueError(f"num_agents must be 2..5, got {num_agents}")
    if topology not in ("chain", "full"):
        raise ValueError(f"unknown topology {topology!r}")
    rng = random.Random(f"pipeline-{seed}")
    sizes = [prefix_tokens] if isinstance(prefix_tokens, int) else list(prefix_tokens)
    picked = set(rng.sample(sorted(ROLES), num_agents - 1))
    roles = [(r, ROLES[r][0]) for r in ROLES if r in picked]  # canonical order: Researcher first
    roles.append((FINAL_ROLE[0], FINAL_ROLE[1][0]))
    agents = tuple(AgentSpec(name, _system_prompt(rng, name, role, num_agents, sizes[i % len(sizes)]))
                   for i, (name, role) in enumerate(roles))
    return Pipeline(agents, topology)


def _turn_instruction(name: str) -> str:
    return FINAL_ROLE[1][1] if name == FINAL_ROLE[0] else ROLES[name][1]


def agent_prompt_segments(pipeline: Pipeline, agent_index: int, task: AgentTask, previous_replies: Sequence[str],
                          chat: ChatFormat = CHATML, *,
                          question_position: Literal["before", "after"] = "before") -> list[Segment]:
    """Segments of agent ``agent_index``'s prompt; ``previous_replies[k]`` is agent ``k``'s reply.

    Layout: prefix (system turn) | own (user header) | shared question | shared fact sheet | shared
    replies (chain: the previous agent's, full: all earlier ones) | own (turn instruction, assistant
    header); ``question_position="after"`` moves the question after the replies. Every segment ends
    with a newline and none starts with whitespace.
    """
    if len(previous_replies) < agent_index:
        raise ValueError(f"agent {agent_index} needs {agent_index} previous replies")
    agent = pipeline.agents[agent_index]
    shown = range(agent_index) if pipeline.topology == "full" else range(max(0, agent_index - 1), agent_index)
    texts = [f"Fact sheet:\n{task.facts}"]
    texts += [f"Message from the {pipeline.agents[k].name}:\n{previous_replies[k].strip() or '(empty)'}\n"
              for k in shown]
    question = f"Question: {task.question}\n"
    texts = [question, *texts] if question_position == "before" else [*texts, question]
    system = chat.system_open + agent.system_prompt + chat.turn_close
    return [Segment(system, "prefix", "prefix-" + C.content_id(system)),
            Segment(chat.user_open, "own"),
            *(Segment(t, "shared", C.content_id(t)) for t in texts),
            Segment(f"{_turn_instruction(agent.name)}{chat.turn_close}{chat.assistant_open}", "own")]


def agent_prompt(pipeline: Pipeline, agent_index: int, task: AgentTask, previous_replies: Sequence[str],
                 chat: ChatFormat = CHATML, **kwargs: Any) -> str:
    """The full prompt text: the concatenation of :func:`agent_prompt_segments`."""
    return "".join(s.text for s in agent_prompt_segments(pipeline, agent_index, task, previous_replies, chat,
                                                         **kwargs))


def run_pipeline(pipeline: Pipeline, task: AgentTask, generate: Callable[[list[Segment]], str],
                 chat: ChatFormat = CHATML, **kwargs: Any) -> list[str]:
    """Run the agents in order with ``generate(segments) -> reply``; returns every agent's reply
    (the last one is the pipeline's answer)."""
    replies: list[str] = []
    for i in range(len(pipeline.agents)):
        replies.append(generate(agent_prompt_segments(pipeline, i, task, replies, chat, **kwargs)))
    return replies
