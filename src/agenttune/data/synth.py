"""The embedded default data: a synthetic tool-use world built by calling ``agenttune.demo_tools``.

    python -m agenttune.data.synth --out DIR [--seed 0] [--train N] [--heldout M]
        [--general K] [--general-heldout K2] [--failed F] [--distractors D] [--copy C]

Every observation is the real output of a demo tool, every final answer is a templated
sentence quoting the values in those observations (so exact match on the final answer is a
meaningful metric; each record's ``meta.gold`` holds it), and the same seed always writes the
same bytes. Files written to DIR:

- ``agent_train.sharegpt.jsonl`` / ``agent_heldout.sharegpt.jsonl``: ShareGPT tool calls
  (human / function_call / observation / gpt, ``tools`` as a JSON string, ``system``).
- ``agent_train.ms_agent.jsonl`` / ``agent_heldout.ms_agent.jsonl``: the same episodes as
  ms-agent ReAct text (``Thought:`` / ``Action:`` / ``Action Input:`` / ``Observation:`` /
  ``Final Answer:``), the APIs listed in the system prompt.
- ``general_train.jsonl`` / ``general_heldout.jsonl``: Alpaca records (arithmetic, capitals,
  word length, sorting, rewriting, copying made-up names out of a text: extract, JSON form,
  repeat; and reading JSON: real words into JSON fields, the names of a JSON list, the cheapest
  of a JSON list of offers), to measure forgetting of non-agent skills.
- ``copy_train.jsonl`` / ``copy_heldout.jsonl``: Alpaca "repeat exactly" records over made-up
  names, codes, dates and numbers: the demo's copy warm-up (``experiment=demo_base``).
- ``trajectories.jsonl``: ShareGPT records with ``reward``: every training episode
  (``reward: true``) plus deliberately failed attempts at them (``reward: false``: wrong tool,
  bad arguments, no final answer, wrong answer), the input of ``agenttune.data.filter``.
- ``manifest.json``: counts by file, task, shape, language and number of calls.

Agent episodes need 0 tool calls (chit-chat, requests no tool can serve), 1 call, 2 calls in
sequence (the second call's arguments come from the first result), 2 parallel calls (one
assistant turn), or span two user turns. Prompts are English or Chinese in both splits. In the
ShareGPT files the first call of a two-call sequence opens with a one-line plan in the prompt's
language, as ``<think>`` reasoning (``PLANS``: "Cheapest flight first, then its price times 6."),
so that the step after the first result reads what is left to do in the model's own words
rather than in a phrasing it may never have seen.

The held-out split never shares a prompt phrasing (template id) or an entity (city, product,
SKU, aisle, date, number) with training: entity pools are partitioned up front
(:func:`agent_pools`) and the phrasing tables are split by hand. Final-answer sentences are
shared, because a model cannot be asked to produce a sentence shape it never saw. They are
worded so that one is not taken for another: no answer goes on where another ends, every Chinese
answer opens with a Chinese word (the language is chosen at the first token, not after a value
both languages would open with), a clause is worded alike wherever it appears, and the aisle's
category keeps the space before it, and so the tokens it has in the question.
General held-out items are (question, entities) never seen in training; capitals are facts,
so held-out capital questions ask countries seen in training with unseen phrasings.

Sizes are small on purpose: a tiny model trains on this on CPU in minutes, so each sample
offers only the tools it needs plus --distractors others (the tool list is rendered into
every prompt), and every tool still appears across the set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..demo_tools import CATEGORIES, CITIES, HELDOUT_CANDIDATES, PRODUCTS, TOOLS, TOOLS_BY_NAME, YEAR, stable_int
from ..inference.agent import run_tool
from .schema import ToolCall, canonical_json
from .templates import react_system_prompt

SPLITS = ("train", "heldout")
LANGS = ("en", "zh")
LANG_WEIGHTS = (0.65, 0.35)
"""Chinese costs about three byte-level tokens per character with the tiny tokenizer."""
SYSTEM = "You are a helpful assistant with tools."
DISTRACTORS = 1
"""Default number of tools offered beyond the ones a sample needs (0-call samples get one more)."""
SCHEMAS = {t.name: t.schema for t in TOOLS}


# ----------------------------------------------------------------------------- entity pools


@dataclass(frozen=True)
class Pools:
    """The entities one split may put into prompts; train and held-out pools are disjoint."""

    cities: tuple[str, ...]
    products: tuple[dict, ...]
    categories: tuple[str, ...]
    dates: tuple[str, ...]
    numbers: tuple[int, ...]

    def small_numbers(self) -> tuple[int, ...]:
        """Counts of people or items (2..9)."""
        return tuple(n for n in self.numbers if n <= 9)


HELDOUT_CATEGORIES = ("bakery", "drinks")


def agent_pools(split: str) -> Pools:
    """Every 4th city of the first 114 (demo_tools.HELDOUT_CANDIDATES) and every 4th product,
    two aisles, a hash-chosen quarter of the days of the year and the numbers 2, 6, 10, ... go to
    the held-out split; the rest to training, with the 262 cities added later."""
    held = split == "heldout"
    held_cities = {c for i, c in enumerate(sorted(HELDOUT_CANDIDATES)) if i % 4 == 3}
    cities = tuple(c for c in sorted(CITIES) if (c in held_cities) == held)
    products = tuple(p for i, p in enumerate(PRODUCTS) if (i % 4 == 3) == held)
    categories = tuple(c for c in CATEGORIES if (c in HELDOUT_CATEGORIES) == held)
    days = [dt.date(YEAR, 1, 1) + dt.timedelta(days=k) for k in range(365)]
    dates = tuple(d.isoformat() for d in days if (stable_int("split", d.isoformat()) % 4 == 0) == held)
    numbers = tuple(n for n in range(2, 100) if (n % 4 == 2) == held)
    return Pools(cities, products, categories, dates, numbers)


# ----------------------------------------------------------------------------- episodes


@dataclass
class Call:
    name: str
    arguments: dict
    observation: str


@dataclass
class Step:
    """One assistant action: a thought and the calls it issues together (2+ = parallel)."""

    thought: str
    calls: list[Call]
    plan: str | None = None
    """What is left to do after these calls, said before them: ShareGPT records carry it as the
    call turn's ``<think>`` reasoning. Only the first step of a two-call chain has one."""


@dataclass
class Turn:
    user: str
    steps: list[Step]
    answer: str | None
    """None only in failed trajectories that stop without a final answer."""
    final_thought: str = "I now know the final answer"


@dataclass
class Episode:
    task: str
    lang: str
    templates: list[str]
    turns: list[Turn]
    needs: list[str]
    """Tools the task uses; the sample offers these plus distractors."""
    entities: dict[str, list] = field(default_factory=dict)
    """What the prompts name, by kind (cities, dates, numbers, products, skus, categories)."""
    tools: list[str] = field(default_factory=list)
    """The tools offered, in prompt order (set by :func:`offer_tools`)."""

    def shape(self) -> str:
        steps = [s for t in self.turns for s in t.steps]
        if len(self.turns) > 1:
            return "multi_turn"
        if any(len(s.calls) > 1 for s in steps):
            return "parallel"
        return {0: "none", 1: "single"}.get(len(steps), "sequential")

    def n_calls(self) -> int:
        return sum(len(s.calls) for t in self.turns for s in t.steps)


def observe(name: str, arguments: dict) -> str:
    """The observation exactly as ``infer.py mode=agent`` shows it to the model: the tool's
    output, or ``Error: ...`` when the call is wrong (so failed trajectories read like real ones)."""
    return run_tool(ToolCall(name, canonical_json(arguments)), TOOLS_BY_NAME)[0]


def call(name: str, **arguments) -> tuple[Call, dict]:
    """Run a demo tool for a task; return the call and its parsed result for the next step."""
    obs, ok = run_tool(ToolCall(name, canonical_json(arguments)), TOOLS_BY_NAME)
    if not ok:  # the task drew entities the tool does not know: a bug in this module
        raise RuntimeError(f"demo tool {name} refused {arguments}: {obs}")
    return Call(name, arguments, obs), json.loads(obs)


# ----------------------------------------------------------------------------- phrasings

# kind -> lang -> split -> phrasings. Template ids are "kind.lang.t0" (train) / "kind.lang.h0".
P = dict[str, dict[str, list[str]]]
PHRASES: dict[str, P] = {
    "greet": {
        "en": {"train": ["Hi!", "Hello there.", "What can you do?", "Good morning!", "Hello, who are you?",
                           "What are you able to help with?"], "heldout": ["Hey, how can you help me?"]},
        "zh": {"train": ["你好！", "嗨，你好。", "你能做什么？", "早上好！", "你好，你是谁？", "你能帮我什么忙？"], "heldout": ["你可以帮我做些什么？"]},
    },
    "cannot": {
        "en": {"train": ["Book a hotel in {city} for {date}.", "Reserve a table for two in {city} tonight.",
                         "What is the stock price of {city} Airlines?", "Order a taxi to {city} airport on {date}.",
                         "Send an email to my boss in {city}.", "Buy me a concert ticket in {city} for {date}.",
                         "Translate this letter for my friend in {city}.", "Set an alarm for {date}."],
               "heldout": ["Rent me a car in {city} on {date}."]},
        "zh": {"train": ["帮我在 {city} 订一家 {date} 的酒店。", "帮我在 {city} 订一张今晚两人的餐桌。",
                         "{city} 航空的股价是多少？", "帮我叫一辆 {date} 去 {city} 机场的出租车。",
                         "给我在 {city} 的老板发一封邮件。", "帮我买一张 {date} 在 {city} 的演唱会门票。",
                         "把这封信翻译给我在 {city} 的朋友。", "帮我设一个 {date} 的闹钟。"],
               "heldout": ["帮我在 {city} 租一辆 {date} 的车。"]},
    },
    "calc": {
        "en": {"train": ["What is {expr}?", "Calculate {expr}.", "Compute {expr} for me."],
               "heldout": ["Please work out {expr}."]},
        "zh": {"train": ["{expr} 等于多少？", "帮我算一下 {expr}。", "计算 {expr}。"], "heldout": ["请算出 {expr} 的结果。"]},
    },
    "convert": {
        "en": {"train": ["Convert {value} {from_unit} to {to_unit}.", "How many {to_unit} is {value} {from_unit}?",
                         "What is {value} {from_unit} in {to_unit}?"],
               "heldout": ["Express {value} {from_unit} in {to_unit}, please."]},
        "zh": {"train": ["把 {value} {from_unit} 换算成 {to_unit}。", "{value} {from_unit} 是多少 {to_unit}？",
                         "{value} {from_unit} 等于几 {to_unit}？"],
               "heldout": ["请将 {value} {from_unit} 转换为 {to_unit}。"]},
    },
    "weather": {
        "en": {"train": ["What's the weather in {city} on {date}?", "Weather for {city} on {date}, please.",
                         "How is the weather in {city} on {date}?"],
               "heldout": ["Will it be nice in {city} on {date}?"]},
        "zh": {"train": ["{city} 在 {date} 的天气怎么样？", "查一下 {city} {date} 的天气。", "{date} {city} 天气如何？"],
               "heldout": ["{date} 去 {city} 天气好吗？"]},
    },
    "days": {
        "en": {"train": ["How many days are there from {start} to {end}?", "Count the days between {start} and {end}.",
                         "How many days from {start} until {end}?"],
               "heldout": ["What's the number of days from {start} to {end}?"]},
        "zh": {"train": ["从 {start} 到 {end} 有多少天？", "{start} 和 {end} 之间相隔几天？", "计算 {start} 到 {end} 的天数。"],
               "heldout": ["{start} 距离 {end} 有几天？"]},
    },
    "aisle": {
        "en": {"train": ["What {category} do you sell?", "List the {category} products.",
                         "Show me your {category} items."],
               "heldout": ["Which {category} products are available?"]},
        "zh": {"train": ["你们有哪些 {category} 类商品？", "列出 {category} 类的商品。", "看看 {category} 类有什么。"],
               "heldout": ["{category} 类商品有哪些？"]},
    },
    "flights": {
        "en": {"train": ["Search for flights leaving {origin} for {destination} on {date}.",
                         "Which flights go from {origin} to {destination} on {date}?",
                         "Search flights {origin} to {destination}, {date}."],
               "heldout": ["Any flights from {origin} to {destination} on {date}?"]},
        "zh": {"train": ["查找 {date} 从 {origin} 到 {destination} 的航班。", "{date} 从 {origin} 飞 {destination} 有哪些航班？",
                         "搜索 {origin} 到 {destination} {date} 的航班。"],
               "heldout": ["{date} 有从 {origin} 去 {destination} 的航班吗？"]},
    },
    "price": {
        "en": {"train": ["How much does {product} cost?", "What's the price of {product}?",
                         "Price of {product}, please."],
               "heldout": ["How much is {product} in your shop?"]},
        "zh": {"train": ["{product} 多少钱？", "{product} 的价格是多少？", "查一下 {product} 的价格。"],
               "heldout": ["你们店的 {product} 卖多少钱？"]},
    },
    "temp_f": {
        "en": {"train": ["What's the temperature in {city} on {date} in Fahrenheit?",
                         "How warm is {city} on {date}, in °F?",
                         "Give me the temperature of {city} on {date} in Fahrenheit."],
               "heldout": ["In Fahrenheit, how hot will {city} be on {date}?"]},
        "zh": {"train": ["{city} {date} 的气温是多少华氏度？", "{date} {city} 的气温换算成华氏度是多少？",
                         "用华氏度告诉我 {city} 在 {date} 的气温。"],
               "heldout": ["{city} 在 {date} 有多少华氏度？"]},
    },
    "trip_cost": {
        "en": {"train": ["What does the cheapest flight from {origin} to {destination} on {date} cost for {n} people?",
                         "Cheapest fare from {origin} to {destination} on {date} for {n} passengers, in total?",
                         "Total price of the cheapest {origin} to {destination} flight on {date} for {n} people?"],
               "heldout": ["For {n} travellers, how much is the cheapest flight {origin} to {destination} on {date}?"]},
        "zh": {"train": ["{date} 从 {origin} 到 {destination} 最便宜的航班，{n} 个人一共多少钱？",
                         "{n} 个人坐 {date} {origin} 到 {destination} 最便宜的航班要多少钱？",
                         "算一下 {date} {origin} 飞 {destination} 最便宜的航班 {n} 人的总价。"],
               "heldout": ["{n} 位乘客乘 {date} 从 {origin} 去 {destination} 最便宜的航班，总价多少？"]},
    },
    "total": {
        "en": {"train": ["I have {a} {u1} and {b} {u2}. How many {u2} is that in total?",
                         "What is {a} {u1} plus {b} {u2}, in {u2}?",
                         "Add {a} {u1} and {b} {u2} and give the total in {u2}."],
               "heldout": ["Sum {a} {u1} with {b} {u2}; answer in {u2}."]},
        "zh": {"train": ["{a} {u1} 加上 {b} {u2} 一共多少 {u2}？", "我有 {a} {u1} 和 {b} {u2}，总共是多少 {u2}？",
                         "把 {a} {u1} 和 {b} {u2} 相加，用 {u2} 表示。"],
               "heldout": ["{a} {u1} 与 {b} {u2} 合计几 {u2}？"]},
    },
    "weather_pair": {
        "en": {"train": ["Compare the weather in {city} and {city2} on {date}.",
                         "What's the weather in {city} and in {city2} on {date}?",
                         "Weather on {date} for {city} and {city2}?"],
               "heldout": ["How do {city} and {city2} look weather-wise on {date}?"]},
        "zh": {"train": ["比较 {date} {city} 和 {city2} 的天气。", "{date} {city} 和 {city2} 的天气怎么样？",
                         "查一下 {city} 和 {city2} 在 {date} 的天气。"],
               "heldout": ["{date} 那天 {city} 与 {city2} 天气各如何？"]},
    },
    "price_pair": {
        "en": {"train": ["Compare the prices of {sku} and {sku2}.", "How much are {sku} and {sku2}?",
                         "Prices for SKUs {sku} and {sku2}?"],
               "heldout": ["What do items {sku} and {sku2} cost?"]},
        "zh": {"train": ["比较 {sku} 和 {sku2} 的价格。", "{sku} 和 {sku2} 各多少钱？", "查询 {sku} 与 {sku2} 的价格。"],
               "heldout": ["商品 {sku} 和 {sku2} 分别卖多少？"]},
    },
    # Second user turns of the multi-turn tasks (the first turn uses the single-task phrasings).
    "weather_more": {
        "en": {"train": ["And in {city2}?", "What about {city2}?", "How about {city2}?"],
               "heldout": ["And {city2}, same day?"]},
        "zh": {"train": ["那 {city2} 呢？", "{city2} 呢？", "再查一下 {city2}。"], "heldout": ["同一天 {city2} 怎么样？"]},
    },
    "calc_more": {
        "en": {"train": ["Now multiply that by {c}.", "Times {c}?", "And that times {c}?"],
               "heldout": ["Multiply the result by {c}."]},
        "zh": {"train": ["再乘以 {c}。", "结果乘 {c} 呢？", "那再乘以 {c} 是多少？"], "heldout": ["把结果乘上 {c}。"]},
    },
    "stock_more": {
        "en": {"train": ["Is it in stock?", "Do you have it in stock?", "Can I buy it today?"],
               "heldout": ["Any left on the shelf?"]},
        "zh": {"train": ["有货吗？", "现在有库存吗？", "今天能买到吗？"], "heldout": ["货架上还有吗？"]},
    },
}

# More training phrasings of the same requests, appended to PHRASES' train lists (template ids
# continue the numbering). Three per task taught a model keywords, not requests: 135M-parameter
# SmolLM2 sent "Will it be nice in Bangkok on 2025-05-08?" (a held-out phrasing) to the calculator.
_MORE_TRAIN: dict[str, dict[str, list[str]]] = {
 "calc": {"en": ["Give me the value of {expr}.", "What does {expr} come to?", "Can you evaluate {expr}?", "Solve {expr}.",
                 "I need the result of {expr}.", "Quick math: {expr}?"],
          "zh": ["{expr} 的结果是什么？", "算算 {expr}。", "帮我求 {expr} 的值。", "{expr} 是多少？", "请计算 {expr} 的值。", "{expr} 算出来等于几？"]},
 "convert": {"en": ["Turn {value} {from_unit} into {to_unit}.", "{value} {from_unit} equals how many {to_unit}?",
                    "Change {value} {from_unit} to {to_unit}.", "I need {value} {from_unit} in {to_unit}.",
                    "What's {value} {from_unit} when converted to {to_unit}?", "Convert {value} {from_unit} into {to_unit} for me."],
             "zh": ["{value} {from_unit} 换成 {to_unit} 是多少？", "帮我把 {value} {from_unit} 转成 {to_unit}。", "{value} {from_unit} 合多少 {to_unit}？",
                    "{value} {from_unit} 折合成 {to_unit} 是多少？", "把 {value} {from_unit} 变成 {to_unit}。", "{value} {from_unit} 相当于多少 {to_unit}？"]},
 "weather": {"en": ["What's the forecast for {city} on {date}?", "Is it going to rain in {city} on {date}?",
                    "How hot or cold will {city} be on {date}?", "Tell me the weather in {city} for {date}.",
                    "What will {city} be like on {date}, weather-wise?", "Sunny or not in {city} on {date}?"],
             "zh": ["{city} {date} 会下雨吗？", "{date} {city} 的天气预报是什么？", "{city} 在 {date} 冷不冷？",
                    "告诉我 {date} {city} 的天气。", "{date} 的 {city} 是晴天吗？", "{city} {date} 天气好不好？"]},
 "days": {"en": ["How long is it from {start} to {end}, in days?", "Days between {start} and {end}?",
                 "How many days separate {start} and {end}?", "From {start} to {end} is how many days?",
                 "Tell me the day count from {start} to {end}.", "What's the gap in days between {start} and {end}?"],
          "zh": ["{start} 到 {end} 一共几天？", "{start} 离 {end} 还有多少天？", "算一下 {start} 至 {end} 的天数。",
                 "从 {start} 到 {end} 隔了多少天？", "{start} 与 {end} 相差几天？", "{start} 到 {end} 之间有几天？"]},
 "aisle": {"en": ["What do you have in {category}?", "Which items are in the {category} aisle?", "Anything in {category}?",
                  "Show the {category} section.", "Do you carry {category}? What exactly?", "Tell me your {category} range."],
           "zh": ["{category} 类都卖什么？", "你们 {category} 区有什么？", "有什么 {category} 类的东西？",
                  "给我看看 {category} 类商品。", "{category} 类有哪些东西卖？", "{category} 货架上有什么？"]},
 "flights": {"en": ["Show me flights {origin} to {destination} on {date}.", "I need a flight from {origin} to {destination} on {date}.",
                    "What flights are there between {origin} and {destination} on {date}?",
                    "Look up {date} flights from {origin} to {destination}.", "Can I fly from {origin} to {destination} on {date}?",
                    "List flights from {origin} to {destination} for {date}."],
             "zh": ["{date} 我要从 {origin} 飞到 {destination}，有航班吗？", "查一下 {origin} 到 {destination} {date} 的航班。",
                    "{date} {origin} 去 {destination} 的飞机有哪些？", "帮我找 {date} 从 {origin} 出发去 {destination} 的航班。",
                    "{origin} 到 {destination}，{date}，有什么航班？", "列出 {date} {origin} 至 {destination} 的航班。"]},
 "price": {"en": ["What does {product} sell for?", "Tell me the price of {product}.", "How expensive is {product}?",
                  "I'd like to buy {product}. What does it cost?", "Cost of {product}?", "What are you charging for {product}?"],
           "zh": ["{product} 卖多少？", "{product} 什么价？", "{product} 贵不贵？多少钱？", "我想买 {product}，多少钱？",
                  "{product} 的售价是多少？", "告诉我 {product} 的价格。"]},
 "temp_f": {"en": ["Tell me {city}'s temperature on {date} in °F.", "What will the temperature be in {city} on {date}, in Fahrenheit?",
                   "In °F, how warm is {city} on {date}?", "{city} on {date}: temperature in Fahrenheit?",
                   "Fahrenheit reading for {city} on {date}?", "How many degrees Fahrenheit in {city} on {date}?"],
            "zh": ["{city} {date} 的气温按华氏度算是几度？", "告诉我 {date} {city} 的华氏温度。", "{date} {city} 气温用华氏度是多少？",
                   "{city} 在 {date} 的温度换成华氏度。", "{city} {date} 的华氏气温是几度？", "用华氏度说一下 {date} {city} 的温度。"]},
 "trip_cost": {"en": ["How much would {n} people pay for the cheapest flight from {origin} to {destination} on {date}?",
                      "Cheapest {origin} to {destination} flight on {date}: total for {n} people?",
                      "We are {n} people flying {origin} to {destination} on {date}. Cheapest total?",
                      "Find the cheapest flight from {origin} to {destination} on {date} and give the total for {n}.",
                      "Total cost for {n} on the cheapest {date} flight from {origin} to {destination}?",
                      "What's the lowest total fare for {n} people, {origin} to {destination}, {date}?"],
               "zh": ["我们 {n} 个人 {date} 从 {origin} 飞 {destination}，最便宜一共多少钱？", "{date} {origin} 到 {destination} 最便宜的航班，{n} 人总价？",
                      "{n} 人坐 {date} 从 {origin} 到 {destination} 最便宜的那班，总共多少钱？", "查 {date} {origin} 飞 {destination} 最便宜的航班，算 {n} 个人的总价。",
                      "{origin} 到 {destination}，{date}，最便宜的航班 {n} 个人要花多少？", "{date} {n} 个人从 {origin} 去 {destination}，最便宜航班的总价是多少？"]},
 "total": {"en": ["{a} {u1} plus {b} {u2} is how many {u2}?", "Combine {a} {u1} and {b} {u2}; give the total in {u2}.",
                  "What's the total of {a} {u1} and {b} {u2} in {u2}?", "Add up {a} {u1} and {b} {u2}, in {u2}.",
                  "How much is {a} {u1} together with {b} {u2}, expressed in {u2}?", "Total {a} {u1} and {b} {u2} in {u2}, please."],
           "zh": ["{a} {u1} 和 {b} {u2} 加起来是多少 {u2}？", "把 {a} {u1} 跟 {b} {u2} 合起来，用 {u2} 表示。", "{a} {u1} 加 {b} {u2} 共几 {u2}？",
                  "{a} {u1} 与 {b} {u2} 的总和是多少 {u2}？", "算一下 {a} {u1} 加 {b} {u2} 等于多少 {u2}。", "{a} {u1} 再加 {b} {u2}，一共多少 {u2}？"]},
 "weather_pair": {"en": ["Weather in both {city} and {city2} on {date}?", "On {date}, what's it like in {city} and {city2}?",
                         "Check the weather for {city} and {city2} on {date}.", "How's the weather on {date} in {city} versus {city2}?",
                         "Give me {date}'s weather for {city} and for {city2}.", "Is the weather better in {city} or {city2} on {date}?"],
                  "zh": ["{date} {city} 和 {city2} 天气分别怎样？", "{city} 与 {city2} 在 {date} 的天气如何？", "看看 {date} {city}、{city2} 两地的天气。",
                         "{date} 的 {city} 和 {city2} 哪里天气好？", "告诉我 {date} {city} 和 {city2} 的天气。", "{city} 和 {city2}，{date}，天气怎么样？"]},
 "price_pair": {"en": ["What are the prices of {sku} and {sku2}?", "Price check: {sku} and {sku2}.", "Tell me what {sku} and {sku2} cost.",
                       "{sku} and {sku2}: how much each?", "Look up the prices of {sku} and {sku2}.", "How much do {sku} and {sku2} cost?"],
                "zh": ["{sku} 和 {sku2} 多少钱？", "查一下 {sku}、{sku2} 的价格。", "{sku} 跟 {sku2} 分别什么价？",
                       "告诉我 {sku} 和 {sku2} 的价格。", "{sku} 与 {sku2} 各卖多少钱？", "{sku}、{sku2} 两个商品的价格是多少？"]},
 "weather_more": {"en": ["And {city2}?", "Same for {city2}?", "How about in {city2}?", "And the weather in {city2}?", "What's it like in {city2}?"],
                  "zh": ["{city2} 的呢？", "{city2} 怎么样？", "那 {city2} 的天气呢？", "换成 {city2} 呢？", "也查查 {city2}。"]},
 "calc_more": {"en": ["Multiply it by {c}.", "Then times {c}.", "What if I multiply by {c}?", "Now times {c}, please.", "And multiplied by {c}?"],
               "zh": ["乘以 {c} 呢？", "再乘 {c} 是多少？", "把它乘以 {c}。", "接着乘 {c}。", "那乘上 {c} 呢？"]},
 "stock_more": {"en": ["Is it available?", "Do you have any?", "Is there stock?", "Can I get it now?", "Is it in the shop right now?"],
                "zh": ["还有吗？", "现在能买吗？", "有没有库存？", "店里有吗？", "还能买到吗？"]},
}
# Requests no demo tool serves. Many of them name a city or a date, as weather and flight
# requests do, so the entities alone never decide that a tool is needed.
_MORE_TRAIN["cannot"] = {
    "en": ["Play some jazz for me.", "Call a plumber in {city}.", "What's the population of {city}?",
           "Write a poem about {city}.", "Remind me to pay rent on {date}.", "Who won the match in {city} on {date}?",
           "Find me a dentist in {city}.", "Book a train from {city} on {date}.", "Tell me a joke.",
           "Cancel my gym membership.", "What movies are on in {city} on {date}?", "Order a pizza to my hotel in {city}."],
    "zh": ["给我放一首爵士乐。", "帮我叫一个 {city} 的水管工。", "{city} 有多少人口？", "写一首关于 {city} 的诗。",
           "提醒我 {date} 交房租。", "{date} 在 {city} 的比赛谁赢了？", "帮我找一个 {city} 的牙医。", "帮我订一张 {date} 从 {city} 出发的火车票。",
           "给我讲个笑话。", "帮我取消健身房会员。", "{date} {city} 有什么电影上映？", "帮我点一份送到 {city} 酒店的披萨。"],
}
for _kind, _langs in _MORE_TRAIN.items():
    for _lang, _extra in _langs.items():
        PHRASES[_kind][_lang]["train"] += _extra

# Greetings and questions about the assistant need no tool, yet a model that saw a few of them
# calls a tool on a new one. Training greetings are a salutation and/or a question about the
# assistant, composed; the held-out phrasings are not among them.
_SALUTE = {"en": ("", "Hi!", "Hello!", "Hey there.", "Good morning!", "Good evening.", "Hi, nice to meet you."),
           "zh": ("", "你好！", "嗨！", "您好。", "早上好！", "晚上好。", "你好，很高兴认识你。")}
_ASK = {"en": ("", "What can you do?", "Who are you?", "What are you able to help with?", "What tools do you have?",
               "What kind of questions can you answer?", "What are you good at?", "Can you tell me about yourself?"),
        "zh": ("", "你能做什么？", "你是谁？", "你能帮我什么忙？", "你有哪些工具？", "你能回答哪些问题？", "你擅长什么？", "介绍一下你自己吧。")}
for _lang in LANGS:
    _sep = " " if _lang == "en" else ""
    _greetings = [f"{a}{_sep}{b}".strip() for a in _SALUTE[_lang] for b in _ASK[_lang] if a or b]
    PHRASES["greet"][_lang]["train"] = [g for g in _greetings if g not in PHRASES["greet"][_lang]["heldout"]]

# Final-answer sentences, shared by both splits (see the module docstring).
ANSWERS: dict[str, dict[str, str]] = {
    "greet": {"en": "Hello! What do you need? I can check weather, flights, groceries, dates, units and arithmetic.",
              "zh": "你好！需要什么帮助？我可以查天气、航班、商品、日期，换算单位和做计算。"},
    "cannot": {"en": "Sorry, I can't do that. My tools cover weather, flights, groceries, dates, units and arithmetic.",
               "zh": "抱歉，我做不到。我的工具只能查天气、航班、商品、日期，换算单位和做计算。"},
    "calc": {"en": "{expr} = {result}.", "zh": "计算：{expr} 等于 {result}。"},
    "convert": {"en": "{value} {from_unit} is {result} {to_unit}.", "zh": "换算：{value} {from_unit} 等于 {result} {to_unit}。"},
    "weather": {"en": "{city} on {date}: {condition}, {temp_c}°C.", "zh": "天气：{city} {date}，{condition_zh}，{temp_c}°C。"},
    "days": {"en": "There are {days} days from {start} to {end}.", "zh": "从 {start} 到 {end} 共 {days} 天。"},
    "aisle": {"en": "In the {category} aisle: {names}.", "zh": "我们的 {category} 类有：{names}。"},
    "flights": {"en": "{count} flights from {origin} to {destination} on {date}; the cheapest is {flight} "
                      "at {depart} for ${price}.",
                "zh": "从 {origin} 到 {destination}，{date} 有 {count} 个航班，最便宜的是 {flight}，{depart} 起飞，{price} 美元。"},
    "price": {"en": "{name} ({sku}) costs ${price} per {unit}.", "zh": "价格：{name}（{sku}）每 {unit} {price} 美元。"},
    "temp_f": {"en": "{city} on {date}: {temp_c}°C, which is {temp_f}°F.",
               "zh": "天气：{city} {date}，{temp_c}°C，即 {temp_f}°F。"},
    "trip_cost": {"en": "The cheapest is {flight} at ${price} per person; for {n} people that is ${total}.",
                  "zh": "最便宜的是 {flight}，每人 {price} 美元，{n} 人共 {total} 美元。"},
    "total": {"en": "{a} {u1} is {converted} {u2}, so the total is {total} {u2}.",
              "zh": "换算：{a} {u1} 等于 {converted} {u2}，合计 {total} {u2}。"},
    "weather_pair": {"en": "{city} on {date}: {condition}, {temp_c}°C; {city2}: {condition2}, {temp_c2}°C.",
                     "zh": "天气：{city} {date}，{condition_zh}，{temp_c}°C；{city2}，{condition2_zh}，{temp_c2}°C。"},
    "price_pair": {"en": "{name} ({sku}) costs ${price} and {name2} ({sku2}) costs ${price2}.",
                   "zh": "价格：{name}（{sku}）{price} 美元，{name2}（{sku2}）{price2} 美元。"},
    "in_stock": {"en": "Yes, {name} is in stock: {in_stock} left.", "zh": "有货，{name} 还剩 {in_stock} 件。"},
    "out_of_stock": {"en": "No, {name} is out of stock.", "zh": "没有，{name} 已经缺货。"},
    "failed": {"en": "Sorry, I could not find that.", "zh": "抱歉，我没能查到。"},
}
# The plan said before the first call of a two-call chain: the second call's reason, written where
# the question is still the last thing read, so the step after the first result reads it back.
PLANS: dict[str, dict[str, str]] = {
    "temp_f": {"en": "Weather first, then its °C in °F.", "zh": "先查天气，再把摄氏度换算成华氏度。"},
    "trip_cost": {"en": "Cheapest flight first, then its price times {n}.", "zh": "先找最便宜的航班，再把票价乘以 {n}。"},
    "total": {"en": "{a} {u1} in {u2} first, then plus {b}.", "zh": "先把 {a} {u1} 换算成 {u2}，再加上 {b}。"},
}
CONDITION_ZH = {"sunny": "晴", "cloudy": "多云", "rain": "雨", "snow": "雪", "windy": "大风", "fog": "雾"}


# Openings and closings around a task's first request, the same in both splits: the phrasing
# proper (the template id) stays split-specific, while the model learns that the words around
# it do not decide the tool. Follow-ups and greetings are left bare.
OPENINGS = {"en": ("", "", "", "Hi, ", "Please: ", "Quick question: ", "Hey! ", "Can you help? "),
            "zh": ("", "", "", "你好，", "请问：", "麻烦帮个忙，", "嗨！")}
CLOSINGS = {"en": ("", "", "", " Thanks!", " Thank you.", " I need it today."),
            "zh": ("", "", "", "谢谢！", "多谢。", "今天要用。")}
BARE = ("greet", "weather_more", "calc_more", "stock_more")


def phrase(rng: random.Random, kind: str, lang: str, split: str) -> tuple[str, str]:
    """A random phrasing of ``kind`` for the split, with its template id."""
    options = PHRASES[kind][lang][split]
    i = rng.randrange(len(options))
    text = options[i]
    if kind not in BARE:
        text = rng.choice(OPENINGS[lang]) + text + rng.choice(CLOSINGS[lang])
    return f"{kind}.{lang}.{split[0]}{i}", text


def answer(kind: str, lang: str, **values) -> str:
    return ANSWERS[kind][lang].format(**values)


# ----------------------------------------------------------------------------- tasks
# Each task builds one Episode for (pools, lang, split); it calls the demo tools for real and
# quotes their results, so the data can never disagree with the tools.


@dataclass(frozen=True)
class Ctx:
    rng: random.Random
    pools: Pools
    lang: str
    split: str

    def phrase(self, kind: str) -> tuple[str, str]:
        return phrase(self.rng, kind, self.lang, self.split)

    def pick(self, items):
        return items[self.rng.randrange(len(items))]

    def two(self, items):
        a, b = self.rng.sample(range(len(items)), 2)
        return items[a], items[b]

    def date_pair(self) -> tuple[str, str]:
        return tuple(sorted(self.two(self.pools.dates)))


def _one(ctx: Ctx, task: str, fields: dict, thought: str, c: Call, answer_text: str, entities: dict) -> Episode:
    tid, text = ctx.phrase(task)
    turn = Turn(text.format(**fields), [Step(thought, [c])], answer_text)
    return Episode(task, ctx.lang, [tid], [turn], [c.name], entities)


def task_greet(ctx: Ctx) -> Episode:
    tid, text = ctx.phrase("greet")
    turn = Turn(text, [], answer("greet", ctx.lang), final_thought="No tool is needed")
    return Episode("greet", ctx.lang, [tid], [turn], [])


def task_cannot(ctx: Ctx) -> Episode:
    city, date = ctx.pick(ctx.pools.cities), ctx.pick(ctx.pools.dates)
    tid, text = ctx.phrase("cannot")
    turn = Turn(text.format(city=city, date=date), [], answer("cannot", ctx.lang),
                final_thought="None of my tools can do this")
    used = ({"cities": [city]} if "{city}" in text else {}) | ({"dates": [date]} if "{date}" in text else {})
    return Episode("cannot", ctx.lang, [tid], [turn], [], used)


def _expression(ctx: Ctx) -> tuple[str, list[int]]:
    nums = ctx.pools.numbers
    a, b, c = ctx.pick(nums), ctx.pick(nums), ctx.pick(ctx.pools.small_numbers())
    form = ctx.rng.randrange(5)
    if form == 3:
        return f"({a} + {b}) * {c}", [a, b, c]
    if form == 4:
        return f"{a} * {c} - {b}", [a, b, c]
    return f"{a} {'+-*'[form]} {b}", [a, b]


def task_calc(ctx: Ctx) -> Episode:
    expr, nums = _expression(ctx)
    c, r = call("calculator", expression=expr)
    return _one(ctx, "calc", {"expr": expr}, f"I will compute {expr}.", c,
                answer("calc", ctx.lang, expr=expr, result=r["result"]), {"numbers": nums})


CONVERSIONS = (("km", "mi"), ("mi", "km"), ("kg", "lb"), ("lb", "kg"), ("C", "F"), ("F", "C"), ("l", "gal"),
               ("gal", "l"), ("ft", "m"), ("m", "ft"), ("in", "cm"), ("g", "oz"), ("oz", "g"), ("ml", "l"))


def task_convert(ctx: Ctx) -> Episode:
    (u1, u2), value = ctx.pick(CONVERSIONS), ctx.pick(ctx.pools.numbers)
    c, r = call("convert_units", value=value, from_unit=u1, to_unit=u2)
    fields = {"value": value, "from_unit": u1, "to_unit": u2}
    return _one(ctx, "convert", fields, f"I will convert {value} {u1} to {u2}.", c,
                answer("convert", ctx.lang, result=r["value"], **fields), {"numbers": [value]})


def _weather_fields(r: dict, suffix: str = "") -> dict:
    return {f"condition{suffix}": r["condition"], f"condition{suffix}_zh": CONDITION_ZH[r["condition"]],
            f"temp_c{suffix}": r["temp_c"]}


def task_weather(ctx: Ctx) -> Episode:
    city, date = ctx.pick(ctx.pools.cities), ctx.pick(ctx.pools.dates)
    c, r = call("get_weather", city=city, date=date)
    return _one(ctx, "weather", {"city": city, "date": date}, f"I need the weather in {city} on {date}.", c,
                answer("weather", ctx.lang, city=city, date=date, **_weather_fields(r)),
                {"cities": [city], "dates": [date]})


def task_days(ctx: Ctx) -> Episode:
    start, end = ctx.date_pair()
    c, r = call("date_diff", start=start, end=end)
    return _one(ctx, "days", {"start": start, "end": end}, f"I will count the days from {start} to {end}.", c,
                answer("days", ctx.lang, start=start, end=end, days=r["days"]), {"dates": [start, end]})


def task_aisle(ctx: Ctx) -> Episode:
    category = ctx.pick(ctx.pools.categories)
    c, r = call("search_products", category=category)
    names = ("、" if ctx.lang == "zh" else ", ").join(p["name"] for p in r["results"])
    return _one(ctx, "aisle", {"category": category}, f"I will list the {category} aisle.", c,
                answer("aisle", ctx.lang, category=category, names=names), {"categories": [category]})


def _cheapest(flights: list[dict]) -> dict:
    return min(flights, key=lambda f: f["price"])


def task_flights(ctx: Ctx) -> Episode:
    (origin, destination), date = ctx.two(ctx.pools.cities), ctx.pick(ctx.pools.dates)
    c, r = call("search_flights", origin=origin, destination=destination, date=date)
    best = _cheapest(r["flights"])
    fields = {"origin": origin, "destination": destination, "date": date}
    return _one(ctx, "flights", fields, f"I will search flights from {origin} to {destination} on {date}.", c,
                answer("flights", ctx.lang, count=len(r["flights"]), **fields, **best),
                {"cities": [origin, destination], "dates": [date]})


def _find_product(product: dict) -> tuple[Step, Step, dict]:
    """Search by name, then look up the SKU the search returned (not the one we know)."""
    c1, found = call("search_products", query=product["name"])
    sku = found["results"][0]["sku"]
    c2, details = call("get_product", sku=sku)
    return (Step(f"I need the SKU of {product['name']}.", [c1]), Step(f"Now I look up {sku}.", [c2]), details)


def task_price(ctx: Ctx) -> Episode:
    product = ctx.pick(ctx.pools.products)
    s1, s2, d = _find_product(product)
    tid, text = ctx.phrase("price")
    turn = Turn(text.format(product=product["name"]), [s1, s2], answer("price", ctx.lang, **d))
    return Episode("price", ctx.lang, [tid], [turn], ["search_products", "get_product"],
                   {"products": [product["name"]]})


def task_temp_f(ctx: Ctx) -> Episode:
    city, date = ctx.pick(ctx.pools.cities), ctx.pick(ctx.pools.dates)
    c1, w = call("get_weather", city=city, date=date)
    c2, f = call("convert_units", value=w["temp_c"], from_unit="C", to_unit="F")
    tid, text = ctx.phrase("temp_f")
    steps = [Step(f"I need the weather in {city} on {date}.", [c1], PLANS["temp_f"][ctx.lang]),
             Step(f"Now I convert {w['temp_c']} C to F.", [c2])]
    turn = Turn(text.format(city=city, date=date), steps,
                answer("temp_f", ctx.lang, city=city, date=date, temp_c=w["temp_c"], temp_f=f["value"]))
    return Episode("temp_f", ctx.lang, [tid], [turn], ["get_weather", "convert_units"],
                   {"cities": [city], "dates": [date]})


def task_trip_cost(ctx: Ctx) -> Episode:
    (origin, destination), date = ctx.two(ctx.pools.cities), ctx.pick(ctx.pools.dates)
    n = ctx.pick(ctx.pools.small_numbers())
    c1, r = call("search_flights", origin=origin, destination=destination, date=date)
    best = _cheapest(r["flights"])
    c2, t = call("calculator", expression=f"{best['price']} * {n}")
    tid, text = ctx.phrase("trip_cost")
    steps = [Step(f"I will search flights from {origin} to {destination} on {date}.", [c1],
                  PLANS["trip_cost"][ctx.lang].format(n=n)),
             Step(f"The cheapest is {best['flight']}; I multiply its price by {n}.", [c2])]
    turn = Turn(text.format(origin=origin, destination=destination, date=date, n=n), steps,
                answer("trip_cost", ctx.lang, flight=best["flight"], price=best["price"], n=n, total=t["result"]))
    return Episode("trip_cost", ctx.lang, [tid], [turn], ["search_flights", "calculator"],
                   {"cities": [origin, destination], "dates": [date], "numbers": [n]})


TOTAL_UNITS = (("mi", "km"), ("lb", "kg"), ("ft", "m"), ("gal", "l"), ("oz", "g"), ("km", "mi"))


def task_total(ctx: Ctx) -> Episode:
    (u1, u2), a, b = ctx.pick(TOTAL_UNITS), ctx.pick(ctx.pools.numbers), ctx.pick(ctx.pools.numbers)
    c1, conv = call("convert_units", value=a, from_unit=u1, to_unit=u2)
    c2, t = call("calculator", expression=f"{conv['value']} + {b}")
    tid, text = ctx.phrase("total")
    steps = [Step(f"I convert {a} {u1} to {u2} first.", [c1], PLANS["total"][ctx.lang].format(a=a, u1=u1, u2=u2, b=b)),
             Step(f"Now I add {b} {u2}.", [c2])]
    turn = Turn(text.format(a=a, b=b, u1=u1, u2=u2), steps,
                answer("total", ctx.lang, a=a, u1=u1, u2=u2, converted=conv["value"], total=t["result"]))
    return Episode("total", ctx.lang, [tid], [turn], ["convert_units", "calculator"], {"numbers": [a, b]})


def task_weather_pair(ctx: Ctx) -> Episode:
    (city, city2), date = ctx.two(ctx.pools.cities), ctx.pick(ctx.pools.dates)
    c1, w1 = call("get_weather", city=city, date=date)
    c2, w2 = call("get_weather", city=city2, date=date)
    tid, text = ctx.phrase("weather_pair")
    turn = Turn(text.format(city=city, city2=city2, date=date),
                [Step(f"I need the weather in {city} and {city2} on {date}.", [c1, c2])],
                answer("weather_pair", ctx.lang, city=city, city2=city2, date=date,
                       **_weather_fields(w1), **_weather_fields(w2, "2")))
    return Episode("weather_pair", ctx.lang, [tid], [turn], ["get_weather"],
                   {"cities": [city, city2], "dates": [date]})


def task_price_pair(ctx: Ctx) -> Episode:
    p1, p2 = ctx.two(ctx.pools.products)
    c1, d1 = call("get_product", sku=p1["sku"])
    c2, d2 = call("get_product", sku=p2["sku"])
    tid, text = ctx.phrase("price_pair")
    turn = Turn(text.format(sku=p1["sku"], sku2=p2["sku"]),
                [Step(f"I look up {p1['sku']} and {p2['sku']}.", [c1, c2])],
                answer("price_pair", ctx.lang, name=d1["name"], sku=d1["sku"], price=d1["price"],
                       name2=d2["name"], sku2=d2["sku"], price2=d2["price"]))
    return Episode("price_pair", ctx.lang, [tid], [turn], ["get_product"], {"skus": [p1["sku"], p2["sku"]]})


def task_weather_more(ctx: Ctx) -> Episode:
    first = task_weather(ctx)
    city2 = ctx.pick([c for c in ctx.pools.cities if c not in first.entities["cities"]])
    date = first.entities["dates"][0]
    c, r = call("get_weather", city=city2, date=date)
    tid, text = ctx.phrase("weather_more")
    first.turns.append(Turn(text.format(city2=city2), [Step(f"I need the weather in {city2} on {date}.", [c])],
                            answer("weather", ctx.lang, city=city2, date=date, **_weather_fields(r))))
    first.task, first.templates = "weather_more", first.templates + [tid]
    first.entities["cities"].append(city2)
    return first


def task_calc_more(ctx: Ctx) -> Episode:
    first = task_calc(ctx)
    previous = json.loads(first.turns[0].steps[0].calls[0].observation)["result"]
    k = ctx.pick(ctx.pools.small_numbers())
    expr = f"{previous} * {k}"
    c, r = call("calculator", expression=expr)
    tid, text = ctx.phrase("calc_more")
    first.turns.append(Turn(text.format(c=k), [Step(f"I will compute {expr}.", [c])],
                            answer("calc", ctx.lang, expr=expr, result=r["result"])))
    first.task, first.templates = "calc_more", first.templates + [tid]
    first.entities["numbers"].append(k)
    return first


def task_stock_more(ctx: Ctx) -> Episode:
    """The follow-up is answered from the earlier observation, with no new call."""
    first = task_price(ctx)
    details = json.loads(first.turns[0].steps[1].calls[0].observation)
    kind = "in_stock" if details["in_stock"] > 0 else "out_of_stock"
    tid, text = ctx.phrase("stock_more")
    first.turns.append(Turn(text, [], answer(kind, ctx.lang, **details),
                            final_thought="The product lookup above answers this"))
    first.task, first.templates = "stock_more", first.templates + [tid]
    return first


@dataclass(frozen=True)
class Task:
    build: Callable[[Ctx], Episode]
    weight: float
    """Relative frequency in a split."""


TASKS: dict[str, Task] = {
    "greet": Task(task_greet, 4), "cannot": Task(task_cannot, 6),
    "calc": Task(task_calc, 8), "convert": Task(task_convert, 7), "weather": Task(task_weather, 8),
    "days": Task(task_days, 6), "aisle": Task(task_aisle, 5), "flights": Task(task_flights, 6),
    "price": Task(task_price, 8), "temp_f": Task(task_temp_f, 6), "trip_cost": Task(task_trip_cost, 6),
    "total": Task(task_total, 5),
    "weather_pair": Task(task_weather_pair, 7), "price_pair": Task(task_price_pair, 5),
    "weather_more": Task(task_weather_more, 5), "calc_more": Task(task_calc_more, 4),
    "stock_more": Task(task_stock_more, 4),
}


def episode_key(ep: Episode) -> str:
    """What makes two samples the same to train on: the messages (tools offered aside)."""
    return canonical_json([[t.user, [[c.name, c.arguments] for s in t.steps for c in s.calls], t.answer]
                           for t in ep.turns])


def offer_tools(ep: Episode, rng: random.Random, distractors: int = DISTRACTORS) -> None:
    """The tools the task needs plus distractors, in a random order. A sample that needs no
    tool still gets one more, so it always shows tools that must not be called."""
    others = [t.name for t in TOOLS if t.name not in ep.needs]
    offered = list(ep.needs) + rng.sample(others, min(len(others), distractors + (not ep.needs)))
    rng.shuffle(offered)
    ep.tools = offered


def agent_episodes(n: int, split: str, seed: int, distractors: int = DISTRACTORS) -> list[Episode]:
    """``n`` distinct episodes. The first ones cycle through every (task, language) pair so
    each appears whenever n allows; the rest are drawn by task weight."""
    rng = random.Random(f"{seed}:agent:{split}")
    pools = agent_pools(split)
    names = list(TASKS)
    weights = [TASKS[name].weight for name in names]
    cycle = [(name, lang) for name in names for lang in LANGS]
    episodes: list[Episode] = []
    seen: set[str] = set()
    attempts = 0
    while len(episodes) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {split} episodes ({len(episodes)} so far); "
                               "ask for fewer or add phrasings/entities")
        if attempts <= len(cycle):
            name, lang = cycle[attempts - 1]
        else:
            name, lang = rng.choices(names, weights)[0], rng.choices(LANGS, LANG_WEIGHTS)[0]
        ep = TASKS[name].build(Ctx(rng, pools, lang, split))
        key = episode_key(ep)
        if key in seen:
            continue
        seen.add(key)
        offer_tools(ep, rng, distractors)
        episodes.append(ep)
    return episodes


# ----------------------------------------------------------------------------- failed trajectories


def example_arguments(name: str, ctx: Ctx) -> dict:
    """Plausible arguments for calling ``name`` where it does not belong (wrong-tool failures)."""
    p = ctx.pools
    if name == "calculator":
        return {"expression": f"{ctx.pick(p.numbers)} + {ctx.pick(p.numbers)}"}
    if name == "convert_units":
        return {"value": ctx.pick(p.numbers), "from_unit": "km", "to_unit": "mi"}
    if name == "get_weather":
        return {"city": ctx.pick(p.cities), "date": ctx.pick(p.dates)}
    if name == "date_diff":
        start, end = ctx.date_pair()
        return {"start": start, "end": end}
    if name == "search_products":
        return {"query": ctx.pick(p.products)["name"]}
    if name == "get_product":
        return {"sku": ctx.pick(p.products)["sku"]}
    origin, destination = ctx.two(p.cities)
    return {"origin": origin, "destination": destination, "date": ctx.pick(p.dates)}


def _broken_arguments(c: Call) -> dict:
    """The call's arguments with its first required field dropped (or emptied when nothing is
    required), so schema validation fails and the observation is the tool's own error."""
    required = SCHEMAS[c.name]["parameters"]["required"]
    return {k: v for k, v in c.arguments.items() if k != required[0]} if required else {}


FAILURES = ("wrong_tool", "bad_arguments", "no_final_answer", "wrong_answer")


def fail(ep: Episode, failure: str, ctx: Ctx, other: Episode) -> Episode:
    """A failed attempt at ``ep``'s last turn (``other``: a different episode of the same task,
    whose answer is the wrong one)."""
    turns = [Turn(t.user, list(t.steps), t.answer, t.final_thought) for t in ep.turns]
    last = turns[-1]
    sorry = ANSWERS["failed"][ep.lang]
    if failure == "wrong_tool":
        name = ctx.pick([t for t in ep.tools if t not in ep.needs])
        arguments = example_arguments(name, ctx)
        last.steps = [Step(f"I will use {name}.", [Call(name, arguments, observe(name, arguments))])]
        last.answer = sorry
    elif failure == "bad_arguments":
        first = last.steps[0].calls[0]
        arguments = _broken_arguments(first)
        last.steps = [Step(last.steps[0].thought, [Call(first.name, arguments, observe(first.name, arguments))])]
        last.answer = sorry
    elif failure == "no_final_answer":
        last.answer = None
    else:
        last.answer = other.turns[-1].answer
    return Episode(ep.task, ep.lang, ep.templates, turns, ep.needs, ep.entities, ep.tools)


def failed_episodes(episodes: list[Episode], n: int, seed: int) -> list[tuple[Episode, str, int]]:
    """``n`` failed attempts at training episodes that call tools: (episode, failure, source index)."""
    rng = random.Random(f"{seed}:failed")
    ctx = Ctx(rng, agent_pools("train"), "en", "train")
    by_task: dict[str, list[int]] = {}
    for i, ep in enumerate(episodes):
        by_task.setdefault(ep.task, []).append(i)
    candidates = [i for i, ep in enumerate(episodes) if ep.turns[-1].steps]
    if n and not candidates:
        raise RuntimeError("no training episode calls a tool, so none can fail; ask for more training episodes")
    # A wrong tool needs a distractor on offer; with distractors=0 there is none.
    kinds = [f for f in FAILURES
             if f != "wrong_tool" or any(len(episodes[i].tools) > len(episodes[i].needs) for i in candidates)]
    out, used = [], set()  # one attempt per (episode, failure): two alike would be duplicate records
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not build {n} failed trajectories; ask for fewer")
        i = ctx.pick(candidates)
        failure = kinds[len(out) % len(kinds)]
        ep = episodes[i]
        others = [j for j in by_task[ep.task]
                  if episodes[j].lang == ep.lang and episodes[j].turns[-1].answer != ep.turns[-1].answer]
        if ((i, failure) in used or (failure == "wrong_tool" and len(ep.needs) >= len(ep.tools))
                or (failure == "wrong_answer" and not others)):
            continue
        used.add((i, failure))
        out.append((fail(ep, failure, ctx, episodes[ctx.pick(others)] if others else ep), failure, i))
    return out


# ----------------------------------------------------------------------------- record writers


def meta(ep: Episode, rid: str, split: str) -> dict:
    """What evaluation needs besides the messages: ``gold`` is the final answer of the last
    user turn (``answers``: of every turn), ``templates`` and ``entities`` prove the split."""
    return {"id": rid, "split": split, "task": ep.task, "shape": ep.shape(), "lang": ep.lang,
            "templates": ep.templates, "calls": ep.n_calls(), "entities": ep.entities,
            "gold": ep.turns[-1].answer, "answers": [t.answer for t in ep.turns]}


def sharegpt_record(ep: Episode, info: dict) -> dict:
    """Parallel calls are one ``function_call`` turn holding a list, answered by one
    ``observation`` turn per call in call order: one tool message each, as the agent loop
    feeds them back at inference."""
    turns = []
    for t in ep.turns:
        turns.append({"from": "human", "value": t.user})
        for s in t.steps:
            calls = [{"name": c.name, "arguments": c.arguments} for c in s.calls]
            value = canonical_json(calls[0] if len(calls) == 1 else calls)
            if s.plan:  # read back as the call turn's reasoning (readers.read_sharegpt)
                value = f"<think>\n{s.plan}\n</think>\n\n{value}"
            turns.append({"from": "function_call", "value": value})
            turns += [{"from": "observation", "value": c.observation} for c in s.calls]
        if t.answer is not None:
            turns.append({"from": "gpt", "value": t.answer})
    tools = canonical_json([SCHEMAS[name] for name in ep.tools])
    return {"conversations": turns, "system": SYSTEM, "tools": tools, "meta": info}


def react_text(turn: Turn) -> str:
    """One assistant value in ms-agent form. Parallel calls become consecutive Action steps."""
    text = ""
    for s in turn.steps:
        text += f"Thought: {s.thought}\n"
        for c in s.calls:
            text += f"Action: {c.name}\nAction Input: {canonical_json(c.arguments)}\nObservation: {c.observation}\n"
    if turn.answer is not None:
        text += f"Thought: {turn.final_thought}\nFinal Answer: {turn.answer}"
    return text


def ms_agent_record(ep: Episode, info: dict) -> dict:
    system = react_system_prompt("", [SCHEMAS[name] for name in ep.tools])
    turns = [{"from": "system", "value": system}]
    for t in ep.turns:
        turns += [{"from": "user", "value": t.user}, {"from": "assistant", "value": react_text(t)}]
    return {"conversations": turns, "meta": info}


# ----------------------------------------------------------------------------- general (non-agent) data

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Austria": "Vienna",
    "Greece": "Athens", "Ireland": "Dublin", "Egypt": "Cairo", "Kenya": "Nairobi", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City", "Peru": "Lima",
    "Chile": "Santiago", "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Turkey": "Ankara", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Morocco": "Rabat", "Nigeria": "Abuja",
    "Cuba": "Havana", "Iceland": "Reykjavik", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "Hungary": "Budapest", "Czechia": "Prague", "Colombia": "Bogota", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Iran": "Tehran", "Ghana": "Accra",
}
WORDS = (
    "apple river stone cloud green table window garden yellow silver orange basket candle forest pencil "
    "rocket summer winter planet bridge castle dragon island jacket kitten ladder marble needle ocean pepper "
    "rabbit saddle tiger violin wagon zebra anchor butter copper desert engine feather guitar hammer igloo "
    "jungle kettle lemon mirror nickel oyster puzzle quartz ribbon spider tunnel umbrella valley walnut "
    "blue quick brown lazy happy small bright quiet gentle brave clever calm fancy little"
).split()

GENERAL: dict[str, dict[str, dict[str, list[str]]]] = {
    "add": {"en": {"train": ["What is {a} plus {b}?", "Add {a} and {b}.", "What do you get when you add {a} to {b}?"],
                   "heldout": ["Tell me the sum of {a} and {b}."]},
            "zh": {"train": ["{a} 加 {b} 等于多少？", "计算 {a} 加 {b}。", "{a} 与 {b} 的和是多少？"],
                   "heldout": ["求 {a} 和 {b} 相加的结果。"]}},
    "times": {"en": {"train": ["What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?"],
                     "heldout": ["How much is {a} multiplied by {b}?"]},
              "zh": {"train": ["{a} 乘 {b} 等于多少？", "计算 {a} 乘以 {b}。", "{a} 和 {b} 的积是多少？"],
                     "heldout": ["{a} 与 {b} 相乘得几？"]}},
    "capital": {"en": {"train": ["What is the capital of {country}?", "Name the capital city of {country}.",
                                 "Which city is the capital of {country}?"],
                       "heldout": ["{country} has which city as its capital?"]}},
    "length": {"en": {"train": ["How many letters are in the word \"{word}\"?", "Count the letters of \"{word}\".",
                                "How long is the word \"{word}\" in letters?"],
                      "heldout": ["Give the number of letters in \"{word}\"."]}},
    "sort": {"en": {"train": ["Sort these numbers from smallest to largest.", "Put these numbers in ascending order.",
                              "Order the numbers from low to high."],
                    "heldout": ["Arrange the following numbers in increasing order."]},
             "zh": {"train": ["把这些数字从小到大排序。", "将下列数字按升序排列。", "请从小到大排列这些数。"],
                    "heldout": ["把下面的数按从小到大的顺序写出。"]}},
    "upper": {"en": {"train": ["Rewrite this in capital letters.", "Convert the text to uppercase.",
                               "Write these words in all caps."],
                     "heldout": ["Change every letter of this text to uppercase."]}},
    "reverse": {"en": {"train": ["Reverse the order of these words.", "Write these words backwards, last word first.",
                                 "List the words in reverse order."],
                       "heldout": ["Flip the word order of this text."]},
                "zh": {"train": ["把这些词倒过来排列。", "将这些单词的顺序反转。", "按相反顺序写出这些词。"],
                       "heldout": ["请把下面单词的先后次序颠倒。"]}},
    # Copying made-up names, codes and dates out of a sentence, as text or as JSON: the skill a tool
    # call's arguments need, on names no pool holds, so it can only be learned as copying. repeat
    # (below) is the densest form: every answer token is a copy, which is what makes a model from
    # scratch grow the attention heads that copy (induction heads) within minutes.
    "extract": {"en": {"train": ["Which name appears in this sentence? Answer with the name only.",
                                 "Copy the name from this sentence.", "Who or what is named here? Just the name."],
                       "heldout": ["Pick out the name in the text below."]},
                "zh": {"train": ["这句话里提到了哪个名字？只回答名字。", "把句子里的名字抄出来。", "这里提到的名字是什么？"],
                       "heldout": ["找出下面这段话中的名字。"]}},
    "form": {"en": {"train": ["Put the name, code and date of this note into JSON.",
                              "Fill a JSON object with the name, code and date mentioned.",
                              "Extract name, code and date as JSON."],
                    "heldout": ["Give me this note's name, code and date as a JSON object."]},
             "zh": {"train": ["把这条记录的名字、编号和日期写成 JSON。", "用 JSON 列出其中的名字、编号和日期。",
                              "提取名字、编号和日期，输出 JSON。"],
                    "heldout": ["请以 JSON 对象给出这条记录里的名字、编号和日期。"]}},
    "repeat": {"en": {"train": ["Repeat exactly.", "Copy this text exactly.", "Say this back word for word."],
                      "heldout": ["Echo the following text without changing it."]},
               "zh": {"train": ["原样重复。", "把这段文字原样抄一遍。", "一字不差地复述。"],
                      "heldout": ["请照抄下面的内容，不要改动。"]}},
    # Reading what a tool returns, on general data: real words into a JSON object (a name the prompt
    # holds as one token, like " Athens", is written in pieces inside JSON, "At" "hens"), every name
    # of a JSON list and nothing more, and the cheapest entry of a JSON list with the count.
    "fields": {"en": {"train": ["Put the person, item and place of this sentence into JSON.",
                                "Fill a JSON object with the name, item and place mentioned.",
                                "Return name, item and place as JSON."],
                      "heldout": ["Give this sentence's person, item and place as a JSON object."]},
               "zh": {"train": ["把这句话里的人名、物品和地点写成 JSON。", "用 JSON 给出句中的名字、物品和地点。",
                                "提取名字、物品和地点，输出 JSON。"],
                      "heldout": ["请以 JSON 对象列出这句话中的人、物品和地点。"]}},
    "names": {"en": {"train": ["List the names in this JSON.", "Which names does this data hold? List them.",
                               "Name every entry of this result."],
                     "heldout": ["Write out all the names this JSON contains."]},
              "zh": {"train": ["列出这段 JSON 里的名字。", "这份数据里有哪些名字？列出来。", "写出这个结果中每一项的名字。"],
                     "heldout": ["把这个 JSON 包含的名字全部写出来。"]}},
    "cheapest": {"en": {"train": ["Which offer is the cheapest?", "Find the lowest price among these offers.",
                                  "How many offers are there, and which costs least?"],
                        "heldout": ["Count the offers below and pick the one with the smallest price."]},
                 "zh": {"train": ["哪个报价最便宜？", "找出这些报价里价格最低的。", "一共有几个报价？哪个最便宜？"],
                        "heldout": ["数一数下面的报价，并选出价格最低的那个。"]}},
}
GENERAL_WEIGHTS = {"add": 3, "times": 2, "capital": 3, "length": 2, "sort": 2, "upper": 2, "reverse": 2,
                   "extract": 5, "form": 6, "repeat": 12, "fields": 6, "names": 4, "cheapest": 4}
FIRST_NAMES = ("Anna Maria John David Laura Peter Sofia James Emma Lucas Olivia Daniel Sarah Michael Elena "
               "Thomas Julia Robert Nina Oscar Clara Henry Alice George Grace Victor Rosa Martin Helen Paul "
               "Irene Simon Diana Felix Carmen Hugo Lena Ivan Vera Adam Eva Leo Mia Noah Ella Omar Leila "
               "Pablo Hannah Kevin").split()
SENTENCES = {"en": ("{name} took the {item} to {place}.", "In {place}, {name} bought a {item}.",
                    "{name} found a {item} near {place}.", "The {item} that {name} sent from {place} arrived."),
             "zh": ("{name} 把 {item} 带到了 {place}。", "{name} 在 {place} 买了一个 {item}。",
                    "{name} 在 {place} 附近找到一个 {item}。", "{name} 从 {place} 寄来的 {item} 到了。")}
OFFERS = {"en": "{count} offers; the cheapest is {code} at {time} for {price}.",
          "zh": "共 {count} 个报价，最便宜的是 {code}，{time}，{price}。"}
SYLLABLES = ("ka ri to mel va sen lor dun bi fa qui zer pol tam ash ni gor vel ru sto han ebb lin mar "
             "os tri yel cor du fen wik ja bro nel pa sim thu ov gal ren").split()
NOTES = {"en": ("{name} ordered {code} on {date}.", "Ship {code} to {name} before {date}.",
                "On {date}, {name} returned item {code}.", "{name} booked room {code} for {date}."),
         "zh": ("{name} 在 {date} 订购了 {code}。", "在 {date} 之前把 {code} 寄给 {name}。",
                "{date}，{name} 退回了 {code}。", "{name} 预订了 {date} 的 {code} 号房间。")}
GENERAL_OUTPUTS = {"add": {"en": "{a} + {b} = {c}.", "zh": "{a} + {b} = {c}。"},
                   "times": {"en": "{a} × {b} = {c}.", "zh": "{a} × {b} = {c}。"}}


def _general_item(task: str, rng: random.Random, lang: str, split: str,
                  countries: list[str]) -> tuple[str, dict, str]:
    """(key, alpaca record without meta, template id). The key names the item (task and
    entities, not the phrasing) and decides its split: an item is held out iff its key
    hashes into the held-out quarter, except capitals (see the module docstring)."""
    options = GENERAL[task][lang][split]
    i = rng.randrange(len(options))
    tid, instruction = f"{task}.{lang}.{split[0]}{i}", options[i]
    if task in ("add", "times"):
        a, b = (rng.randint(2, 99), rng.randint(2, 99)) if task == "add" else (rng.randint(2, 12), rng.randint(2, 12))
        c = a + b if task == "add" else a * b
        key = f"{task}:{a}:{b}"
        record = {"instruction": instruction.format(a=a, b=b), "input": "",
                  "output": GENERAL_OUTPUTS[task][lang].format(a=a, b=b, c=c)}
    elif task == "capital":
        country = rng.choice(countries)
        key = f"capital:{country}:{tid}"
        record = {"instruction": instruction.format(country=country), "input": "",
                  "output": f"The capital of {country} is {CAPITALS[country]}."}
    elif task == "length":
        word = rng.choice(WORDS)
        key = f"length:{word}"
        record = {"instruction": instruction.format(word=word), "input": "",
                  "output": f"\"{word}\" has {len(word)} letters."}
    elif task == "sort":
        nums = rng.sample(range(1, 100), rng.randint(3, 5))
        key = "sort:" + ",".join(map(str, nums))
        record = {"instruction": instruction, "input": ", ".join(map(str, nums)),
                  "output": ", ".join(map(str, sorted(nums)))}
    elif task == "repeat":
        text = " ".join(_made_up_item(rng) for _ in range(rng.randint(3, 6)))
        key = f"repeat:{text}"
        record = {"instruction": instruction, "input": text, "output": text}
    elif task in ("extract", "form"):
        name, code, date = _made_up_name(rng), _made_up_code(rng), _made_up_date(rng)
        key = f"{task}:{name}:{code}:{date}"
        note = rng.choice(NOTES[lang]).format(name=name, code=code, date=date)
        output = name if task == "extract" else canonical_json({"name": name, "code": code, "date": date})
        record = {"instruction": instruction, "input": note, "output": output}
    elif task == "fields":
        name, item, place = rng.choice(FIRST_NAMES), rng.choice(NOUNS), rng.choice(PLACES)
        key = f"fields:{name}:{item}:{place}"
        record = {"instruction": instruction,
                  "input": rng.choice(SENTENCES[lang]).format(name=name, item=item, place=place),
                  "output": canonical_json({"name": name, "item": item, "place": place})}
    elif task == "names":
        names, count = [], rng.randint(2, 7)
        while len(names) < count:
            name = _made_up_name(rng) if rng.random() < 0.4 else " ".join(
                rng.choice(NOUNS).capitalize() for _ in range(rng.choice((1, 1, 2))))
            names += [name] if name not in names else []
        key = "names:" + "|".join(names)
        results = [{"id": _made_up_code(rng), "name": name} for name in names]
        record = {"instruction": instruction, "input": canonical_json({"results": results}),
                  "output": ("、" if lang == "zh" else ", ").join(names) + ("。" if lang == "zh" else ".")}
    elif task == "cheapest":
        count = rng.randint(2, 4)
        prices = rng.sample(range(20, 990, 5), count)
        offers = [{"code": _made_up_code(rng), "time": f"{rng.randint(5, 22):02d}:{rng.choice((0, 15, 30, 45)):02d}",
                   "price": price} for price in prices]
        best = min(offers, key=lambda o: o["price"])
        key = "cheapest:" + canonical_json(offers)
        record = {"instruction": instruction, "input": canonical_json({"offers": offers}),
                  "output": OFFERS[lang].format(count=count, **best)}
    else:
        text = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        key = f"{task}:{text}"
        out = text.upper() if task == "upper" else " ".join(reversed(text.split()))
        record = {"instruction": instruction, "input": text, "output": out}
    return key, record, tid


NOUNS = WORDS[:WORDS.index("blue")]
PLACES = tuple(sorted(set(agent_pools("train").cities) | set(CAPITALS)))
"""Training cities and countries: the places ``fields`` writes into JSON (no held-out city)."""


def _made_up_name(rng: random.Random) -> str:
    """A name no pool holds (one or two words of 2-3 syllables): copying is the only way to get it right."""
    word = lambda: "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()  # noqa: E731
    return word() if rng.random() < 0.6 else f"{word()} {word()}"


def _made_up_code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(100, 999)}"


def _made_up_date(rng: random.Random) -> str:
    return (dt.date(2020, 1, 1) + dt.timedelta(days=rng.randrange(3650))).isoformat()


def _made_up_item(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return _made_up_name(rng)
    if kind == 1:
        return _made_up_code(rng)
    return _made_up_date(rng) if kind == 2 else str(rng.randint(2, 999))


def _general_split_of(key: str) -> str:
    if key.startswith("capital:"):
        return "either"
    return "heldout" if stable_int("general", key) % 4 == 0 else "train"


def general_records(n: int, split: str, seed: int, countries: list[str], tasks: tuple[str, ...] = tuple(GENERAL),
                    label: str = "general") -> list[dict]:
    """``n`` distinct general items of the split, of ``tasks``. The task and language are drawn
    first and the item is redrawn until it belongs to the split, so the split rule does not skew
    the task mix; a task whose items are used up is drawn again less and less often."""
    rng = random.Random(f"{seed}:{label}:{split}")
    tasks = list(tasks)
    pairs = [(t, lang) for t in tasks for lang in LANGS if lang in GENERAL[t]]
    records, seen, draws = [], set(), 0
    while len(records) < n:
        draws += 1
        if draws > 20 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct general {split} items ({len(records)} so far)")
        if draws <= len(pairs):
            task, lang = pairs[draws - 1]
        else:
            task = rng.choices(tasks, [GENERAL_WEIGHTS[t] for t in tasks])[0]
            langs = [lang for lang in LANGS if lang in GENERAL[task]]
            lang = rng.choices(langs, [LANG_WEIGHTS[LANGS.index(lang)] for lang in langs])[0]
        for _ in range(50):
            key, record, tid = _general_item(task, rng, lang, split, countries)
            if _general_split_of(key) in (split, "either") and key not in seen:
                break
        else:
            continue
        seen.add(key)
        record["meta"] = {"id": f"{label}-{split}-{len(records):05d}", "split": split, "task": task, "lang": lang,
                          "template": tid, "key": key, "gold": record["output"]}
        records.append(record)
    return records


# ----------------------------------------------------------------------------- generate


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _summary(records: list[dict]) -> dict:
    metas = [r["meta"] for r in records]
    count = lambda key: dict(sorted(Counter(m[key] for m in metas).items()))  # noqa: E731
    return {"records": len(records), "by_task": count("task"), "by_lang": count("lang"),
            **({"by_shape": count("shape"), "by_calls": count("calls")} if "shape" in metas[0] else {})}


def generate(out_dir: str | Path, seed: int = 0, train: int = 4000, heldout: int = 120, general: int = 4000,
             general_heldout: int = 120, failed: int | None = None, distractors: int = DISTRACTORS,
             copy: int = 8000, copy_heldout: int = 100) -> dict:
    """Write every file of the synthetic set into ``out_dir``; return the manifest
    (paths, counts). ``failed`` defaults to a quarter of ``train``."""
    if not 0 <= distractors < len(TOOLS):
        raise ValueError(f"distractors must be between 0 and {len(TOOLS) - 1}, got {distractors}")
    for name, value in (("train", train), ("heldout", heldout), ("general", general),
                        ("general_heldout", general_heldout), ("copy", copy), ("copy_heldout", copy_heldout)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    failed = train // 4 if failed is None else failed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[dict]] = {}

    for split, n in (("train", train), ("heldout", heldout)):
        episodes = agent_episodes(n, split, seed, distractors)
        infos = [meta(ep, f"{split}-{i:05d}", split) for i, ep in enumerate(episodes)]
        files[f"agent_{split}.sharegpt.jsonl"] = [sharegpt_record(ep, m) for ep, m in zip(episodes, infos)]
        files[f"agent_{split}.ms_agent.jsonl"] = [ms_agent_record(ep, m) for ep, m in zip(episodes, infos)]
        if split == "train":
            trajectories = [dict(r, reward=True) for r in files["agent_train.sharegpt.jsonl"]]
            for k, (ep, failure, source) in enumerate(failed_episodes(episodes, failed, seed)):
                # The meta describes the task that was attempted: its gold is the right answer.
                info = infos[source] | {"id": f"failed-{k:05d}", "failure": failure, "attempt_of": infos[source]["id"]}
                trajectories.append(dict(sharegpt_record(ep, info), reward=False))
            # Interleave, as a rollout log would be; the filter must find the failures anywhere.
            random.Random(f"{seed}:trajectories").shuffle(trajectories)
            files["trajectories.jsonl"] = trajectories

    general_train = general_records(general, "train", seed, sorted(CAPITALS))
    # Capitals are facts: held-out questions ask only countries the training set taught.
    taught = sorted({r["meta"]["key"].split(":")[1] for r in general_train if r["meta"]["task"] == "capital"})
    files["general_train.jsonl"] = general_train
    files["general_heldout.jsonl"] = general_records(general_heldout, "heldout", seed, taught)
    # The copy warm-up of the demo (conf/experiment/demo_base.yaml): repeat only.
    files["copy_train.jsonl"] = general_records(copy, "train", seed, [], ("repeat",), "copy")
    files["copy_heldout.jsonl"] = general_records(copy_heldout, "heldout", seed, [], ("repeat",), "copy")

    for name, records in files.items():
        _write_jsonl(out / name, records)
    failures = Counter(r["meta"]["failure"] for r in files["trajectories.jsonl"] if not r["reward"])
    manifest = {
        "seed": seed,
        "distractors": distractors,
        "files": {name: _summary(records) for name, records in files.items()},
        "trajectories": {"reward_true": train, "reward_false": dict(sorted(failures.items()))},
        "tools": [t.name for t in TOOLS],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    manifest["paths"] = {name: str(out / name) for name in [*files, "manifest.json"]}
    return manifest


def _code_hash() -> str:
    """Hash of every module whose code decides the generated bytes."""
    from .. import demo_tools, tools
    from ..inference import agent
    from . import schema, templates

    h = hashlib.sha256()
    for module in (sys.modules[__name__], demo_tools, tools, agent, schema, templates):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:12]


def default_dir() -> Path:
    """The set at the default seed and sizes, generated into ``$AGENTTUNE_CACHE`` on first use;
    data paths name its files as ``synth://agent_train.sharegpt.jsonl``. The folder is named by
    a hash of the generating code, so a changed generator or tool never serves stale files."""
    from ..tiny import atomic_build, cache_dir

    return atomic_build(cache_dir() / f"synth-{_code_hash()}", generate)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agenttune.data.synth", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write the files into (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--train", type=int, default=4000, help="agent training episodes (default 4000)")
    p.add_argument("--heldout", type=int, default=120, help="held-out agent episodes (default 120)")
    p.add_argument("--general", type=int, default=4000, help="general (Alpaca) training records (default 4000)")
    p.add_argument("--general-heldout", type=int, default=120, help="held-out general records (default 120)")
    p.add_argument("--failed", type=int, help="failed trajectories in trajectories.jsonl (default: train/4)")
    p.add_argument("--copy", type=int, default=8000, help="copy warm-up records, repeat only (default 8000)")
    p.add_argument("--copy-heldout", type=int, default=100, help="held-out copy records (default 100)")
    p.add_argument("--distractors", type=int, default=DISTRACTORS,
                   help=f"tools offered beyond those a sample needs (default {DISTRACTORS}; 0 gives the shortest prompts)")
    args = p.parse_args(argv)
    try:
        manifest = generate(args.out, seed=args.seed, train=args.train, heldout=args.heldout, general=args.general,
                            general_heldout=args.general_heldout, failed=args.failed, distractors=args.distractors,
                            copy=args.copy, copy_heldout=args.copy_heldout)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # --out cannot be made or written: a read-only place, a full disk
        print(f"error: --out {args.out}: cannot write there ({err.strerror or err})", file=sys.stderr)
        return 1
    for name, summary in manifest["files"].items():
        print(f"{summary['records']:6d}  {manifest['paths'][name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
