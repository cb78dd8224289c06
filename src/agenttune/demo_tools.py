"""A small deterministic tool world: the bundled ``tools=agenttune.demo_tools``.

The synthetic data generator (``agenttune.data.synth``) calls these tools to write its
observations, and ``infer.py mode=agent`` can call the very same functions, so what a model
sees at inference is what it saw in training. Every result is a pure function of the
arguments: no clock, no randomness, no network. Where a "table" would be large (weather for
every city and day, flights for every route and day) it is derived from a SHA-256 of the key,
which is stable across machines and Python versions, unlike ``hash()``.

Descriptions carry no trailing period because the ms-agent system prompt appends one.
"""

from __future__ import annotations

import ast
import datetime as dt
import difflib
import hashlib
import math
import operator

from .tools import Tool, ToolError

# ----------------------------------------------------------------------------- helpers

YEAR = 2025
"""Weather and flight tables cover this calendar year."""


def stable_int(*parts: object) -> int:
    """A deterministic non-negative integer for a key (same on every machine and run)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def tidy(x: float) -> int | float:
    """Round for display: integers stay integers, other values keep 2 decimals (4 below 1),
    so observations and the final answers quoting them stay short and exact."""
    if isinstance(x, int):
        return x
    x = round(x, 2) if abs(x) >= 1 else round(x, 4)
    return int(x) if x == int(x) else x


def parse_date(text: str, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ToolError(f"{what} {text!r} is not a valid date; write YYYY-MM-DD") from None


def _date_in_year(text: str, what: str) -> dt.date:
    day = parse_date(text, what)
    if day.year != YEAR:
        raise ToolError(f"{what} {text} is outside the table; it covers {YEAR}-01-01 to {YEAR}-12-31")
    return day


# ----------------------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**100
"""Bounds every intermediate value, so ``(10**64)**64**...`` cannot stall the process."""


def _evaluate(node: ast.AST) -> int | float:
    # Walk the parsed tree and allow only numbers and arithmetic: names, calls, attributes and
    # subscripts are refused, so `__import__('os')` is an error, not code. Never eval().
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        value = _BINARY[type(node.op)](left, right)
        if abs(value) > MAX_MAGNITUDE:
            raise ToolError("a number in the expression exceeds 1e100")
        return value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ToolError("`^` is not a power here; write ** for powers")
    raise ToolError(f"only numbers and + - * / // % ** ( ) are allowed, found `{ast.unparse(node)}`")


def calculator(expression: str) -> dict:
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r} as arithmetic") from None
    try:
        value = _evaluate(tree.body)
    except OverflowError:
        raise ToolError("a number in the expression exceeds 1e100") from None
    if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
        raise ToolError("the result is not a finite real number")
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        value = int(value)
    return {"result": value if isinstance(value, int) else round(value, 6)}


# ----------------------------------------------------------------------------- unit conversion

# Factor to the dimension's base unit (m, kg, l); temperatures convert through Celsius.
_FACTORS = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01),
    "mi": ("length", 1609.344), "ft": ("length", 0.3048), "in": ("length", 0.0254),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
    "l": ("volume", 1.0), "ml": ("volume", 0.001), "gal": ("volume", 3.785411784),
}
_TEMPERATURE = ("C", "F", "K")
UNITS = list(_FACTORS) + list(_TEMPERATURE)


def _to_celsius(value: float, unit: str) -> float:
    return {"C": value, "F": (value - 32) * 5 / 9, "K": value - 273.15}[unit]


def _from_celsius(value: float, unit: str) -> float:
    return {"C": value, "F": value * 9 / 5 + 32, "K": value + 273.15}[unit]


def convert_units(value: float, from_unit: str, to_unit: str) -> dict:
    if from_unit in _TEMPERATURE or to_unit in _TEMPERATURE:
        if not (from_unit in _TEMPERATURE and to_unit in _TEMPERATURE):
            raise ToolError(f"cannot convert {from_unit} to {to_unit}: only C, F and K convert to each other")
        result = _from_celsius(_to_celsius(value, from_unit), to_unit)
    else:
        (dim_from, f_from), (dim_to, f_to) = _FACTORS[from_unit], _FACTORS[to_unit]
        if dim_from != dim_to:
            raise ToolError(f"cannot convert {from_unit} ({dim_from}) to {to_unit} ({dim_to})")
        result = value * f_from / f_to
    return {"value": tidy(result), "unit": to_unit}


# ----------------------------------------------------------------------------- weather

# city -> (mean temperature in °C, hemisphere sign: +1 north, -1 south, 0 tropics)
CITIES: dict[str, tuple[int, int]] = {
    "Oslo": (6, 1), "Rome": (16, 1), "Paris": (12, 1), "Berlin": (10, 1), "Madrid": (15, 1),
    "Lisbon": (17, 1), "Vienna": (11, 1), "Prague": (9, 1), "Dublin": (10, 1), "Athens": (18, 1),
    "Cairo": (22, 1), "Tokyo": (16, 1), "Seoul": (13, 1), "Beijing": (13, 1), "Shanghai": (17, 1),
    "Toronto": (9, 1), "Chicago": (10, 1), "Denver": (10, 1), "Boston": (11, 1), "Helsinki": (6, 1),
    "Warsaw": (9, 1), "Istanbul": (15, 1), "Osaka": (17, 1), "Hangzhou": (17, 1),
    "Nairobi": (19, 0), "Singapore": (28, 0), "Mumbai": (27, 0), "Lima": (19, -1),
    "Sydney": (18, -1), "Auckland": (15, -1), "Santiago": (14, -1), "Perth": (19, -1),
    # Many names, so that a model can only get the held-out ones (every 4th) right by copying.
    "Amsterdam": (10, 1), "Brussels": (11, 1), "Copenhagen": (9, 1), "Stockholm": (7, 1), "Zurich": (9, 1),
    "Munich": (9, 1), "Hamburg": (9, 1), "Milan": (13, 1), "Naples": (16, 1), "Barcelona": (16, 1),
    "Valencia": (18, 1), "Porto": (15, 1), "Seville": (19, 1), "Marseille": (15, 1), "Lyon": (12, 1),
    "Edinburgh": (9, 1), "Manchester": (10, 1), "Glasgow": (9, 1), "Budapest": (11, 1), "Bucharest": (11, 1),
    "Sofia": (10, 1), "Belgrade": (12, 1), "Zagreb": (11, 1), "Krakow": (8, 1), "Riga": (7, 1),
    "Vilnius": (7, 1), "Tallinn": (6, 1), "Reykjavik": (5, 1), "Kyiv": (8, 1), "Tbilisi": (13, 1),
    "Baku": (15, 1), "Tehran": (17, 1), "Dubai": (28, 1), "Doha": (27, 1), "Riyadh": (26, 1),
    "Delhi": (25, 1), "Kathmandu": (19, 1), "Hanoi": (24, 1), "Taipei": (23, 1), "Kyoto": (16, 1),
    "Sapporo": (9, 1), "Busan": (15, 1), "Nanjing": (16, 1), "Wuhan": (17, 1), "Chengdu": (16, 1),
    "Harbin": (5, 1), "Montreal": (7, 1), "Vancouver": (11, 1), "Seattle": (12, 1), "Portland": (12, 1),
    "Phoenix": (24, 1), "Dallas": (19, 1), "Houston": (21, 1), "Atlanta": (17, 1), "New York": (13, 1),
    "Los Angeles": (18, 1), "San Francisco": (14, 1), "Miami": (25, 0), "Havana": (25, 0),
    "Mexico City": (17, 0), "Hong Kong": (23, 0), "Kuala Lumpur": (28, 0), "Bangkok": (29, 0),
    "Manila": (28, 0), "Jakarta": (27, 0), "Lagos": (27, 0), "Accra": (27, 0), "Bogota": (14, 0),
    "Quito": (14, 0), "Chennai": (29, 0), "Colombo": (27, 0), "Melbourne": (15, -1), "Brisbane": (21, -1),
    "Adelaide": (17, -1), "Wellington": (13, -1), "Christchurch": (12, -1), "Buenos Aires": (18, -1),
    "Montevideo": (16, -1), "Cape Town": (17, -1), "Johannesburg": (16, -1), "Durban": (21, -1),
    "Sao Paulo": (19, -1),
}
HELDOUT_CANDIDATES = tuple(CITIES)
"""The names above. Every 4th of them, sorted, is a held-out city (agenttune.data.synth); the ones
below are for training only, so the held-out split stays what it was when they were added."""
# More names for training. With 86 training cities, each in about 31 episodes, SmolLM2-135M
# learned the names more than the copying: held-out Manchester came out as Munich, Busan as
# "Barsan", Johannesburg as "Johaan" (BENCHMARKS.md). Words that read as English in a question
# ("Nice", "Split") are left out.
CITIES |= {
    # Europe
    "Bergen": (8, 1), "Trondheim": (5, 1), "Gothenburg": (8, 1), "Malmo": (9, 1), "Uppsala": (6, 1),
    "Aarhus": (8, 1), "Odense": (8, 1), "Tampere": (5, 1), "Turku": (6, 1), "Oulu": (3, 1),
    "Tartu": (6, 1), "Kaunas": (7, 1), "Minsk": (7, 1), "Lviv": (8, 1), "Odesa": (11, 1),
    "Kharkiv": (8, 1), "Chisinau": (10, 1), "Iasi": (10, 1), "Timisoara": (11, 1), "Varna": (13, 1),
    "Plovdiv": (12, 1), "Skopje": (13, 1), "Tirana": (16, 1), "Podgorica": (16, 1), "Sarajevo": (10, 1),
    "Ljubljana": (11, 1), "Bratislava": (10, 1), "Brno": (9, 1), "Gdansk": (8, 1),
    "Wroclaw": (9, 1), "Poznan": (9, 1), "Leipzig": (9, 1), "Dresden": (9, 1), "Cologne": (11, 1),
    "Frankfurt": (10, 1), "Stuttgart": (10, 1), "Dusseldorf": (11, 1), "Hanover": (9, 1), "Bremen": (9, 1),
    "Nuremberg": (9, 1), "Salzburg": (9, 1), "Innsbruck": (9, 1), "Graz": (10, 1), "Geneva": (11, 1),
    "Basel": (10, 1), "Bern": (9, 1), "Lausanne": (11, 1), "Turin": (13, 1), "Bologna": (14, 1),
    "Florence": (15, 1), "Venice": (14, 1), "Genoa": (16, 1), "Palermo": (19, 1), "Bari": (17, 1),
    "Verona": (13, 1), "Bilbao": (15, 1), "Malaga": (19, 1), "Zaragoza": (15, 1), "Granada": (15, 1),
    "Bordeaux": (13, 1), "Toulouse": (14, 1), "Nantes": (12, 1), "Strasbourg": (11, 1),
    "Lille": (11, 1), "Rotterdam": (11, 1), "Utrecht": (10, 1), "Antwerp": (11, 1), "Ghent": (11, 1),
    "Luxembourg": (9, 1), "Cardiff": (11, 1), "Bristol": (11, 1), "Liverpool": (10, 1), "Leeds": (10, 1),
    "Birmingham": (10, 1), "Belfast": (10, 1), "Cork": (10, 1), "Galway": (10, 1), "Aberdeen": (9, 1),
    "Newcastle": (9, 1), "Oxford": (11, 1), "Cambridge": (11, 1), "Coimbra": (16, 1), "Faro": (18, 1),
    "Thessaloniki": (16, 1), "Heraklion": (19, 1), "Nicosia": (19, 1), "Valletta": (19, 1), "Izmir": (18, 1),
    "Ankara": (12, 1), "Antalya": (19, 1), "Yerevan": (12, 1), "Moscow": (6, 1), "Kazan": (5, 1),
    "Novosibirsk": (1, 1), "Yekaterinburg": (3, 1), "Vladivostok": (5, 1), "Almaty": (10, 1), "Tashkent": (15, 1),
    "Bishkek": (11, 1), "Samarkand": (14, 1), "Astana": (3, 1), "Ulaanbaatar": (0, 1),
    # Middle East and Africa
    "Beirut": (20, 1), "Amman": (17, 1), "Jerusalem": (17, 1), "Tel Aviv": (21, 1), "Baghdad": (23, 1),
    "Kuwait City": (26, 1), "Muscat": (28, 1), "Abu Dhabi": (28, 1), "Manama": (27, 1), "Jeddah": (28, 1),
    "Alexandria": (21, 1), "Luxor": (25, 1), "Casablanca": (18, 1), "Marrakesh": (20, 1), "Rabat": (17, 1),
    "Tunis": (18, 1), "Algiers": (18, 1), "Khartoum": (30, 0), "Addis Ababa": (16, 0), "Kampala": (22, 0),
    "Kigali": (21, 0), "Dar es Salaam": (26, 0), "Zanzibar": (26, 0), "Mombasa": (26, 0), "Kinshasa": (25, 0),
    "Luanda": (25, 0), "Dakar": (24, 0), "Abidjan": (27, 0), "Harare": (18, -1), "Lusaka": (20, -1),
    "Windhoek": (20, -1), "Gaborone": (21, -1), "Maputo": (23, -1), "Pretoria": (18, -1),
    "Antananarivo": (18, -1), "Port Louis": (24, -1),
    # Asia
    "Karachi": (26, 1), "Lahore": (24, 1), "Islamabad": (21, 1), "Dhaka": (26, 1), "Kolkata": (27, 1),
    "Bangalore": (24, 0), "Hyderabad": (27, 0), "Pune": (25, 0), "Ahmedabad": (27, 1), "Jaipur": (25, 1),
    "Kochi": (27, 0), "Yangon": (27, 0), "Mandalay": (27, 1), "Chiang Mai": (26, 0), "Phuket": (28, 0),
    "Phnom Penh": (28, 0), "Vientiane": (26, 0), "Ho Chi Minh City": (28, 0), "Da Nang": (26, 0),
    "Cebu": (28, 0), "Davao": (28, 0), "Denpasar": (27, 0), "Surabaya": (27, 0), "Bandung": (23, 0),
    "Medan": (27, 0), "Penang": (28, 0), "Macau": (23, 0), "Shenzhen": (23, 0), "Guangzhou": (22, 1),
    "Xiamen": (21, 1), "Fuzhou": (20, 1), "Kunming": (15, 1), "Guilin": (19, 1), "Chongqing": (18, 1),
    "Changsha": (17, 1), "Suzhou": (16, 1), "Qingdao": (13, 1), "Tianjin": (13, 1), "Dalian": (11, 1),
    "Shenyang": (8, 1), "Lhasa": (8, 1), "Urumqi": (7, 1), "Nagoya": (16, 1), "Fukuoka": (17, 1),
    "Hiroshima": (16, 1), "Sendai": (12, 1), "Yokohama": (16, 1), "Kobe": (17, 1), "Naha": (23, 1),
    "Incheon": (12, 1), "Daegu": (14, 1), "Jeju": (16, 1), "Gwangju": (14, 1), "Kaohsiung": (25, 0),
    "Taichung": (23, 1),
    # The Americas
    "Ottawa": (6, 1), "Calgary": (4, 1), "Edmonton": (4, 1), "Winnipeg": (3, 1), "Quebec City": (5, 1),
    "Halifax": (7, 1), "Minneapolis": (8, 1), "Detroit": (10, 1), "Philadelphia": (13, 1),
    "Washington": (15, 1), "Baltimore": (14, 1), "Pittsburgh": (11, 1), "Cleveland": (11, 1),
    "Nashville": (15, 1), "Charlotte": (16, 1), "New Orleans": (21, 1), "Austin": (21, 1),
    "San Antonio": (21, 1), "San Diego": (18, 1), "Las Vegas": (20, 1), "Salt Lake City": (11, 1),
    "Albuquerque": (14, 1), "Kansas City": (13, 1), "Orlando": (23, 1), "Tampa": (23, 1), "Honolulu": (25, 0),
    "Anchorage": (3, 1), "Sacramento": (16, 1), "Guadalajara": (20, 0), "Monterrey": (22, 1), "Cancun": (27, 0),
    "Guatemala City": (19, 0), "Panama City": (27, 0), "Kingston": (27, 0), "San Juan": (27, 0),
    "Santo Domingo": (26, 0), "Caracas": (22, 0), "Medellin": (22, 0), "Cartagena": (28, 0), "Guayaquil": (26, 0),
    "Cusco": (10, -1), "Arequipa": (15, -1), "La Paz": (8, -1), "Asuncion": (23, -1), "Rio de Janeiro": (24, -1),
    "Brasilia": (21, -1), "Salvador": (25, 0), "Recife": (26, 0), "Fortaleza": (27, 0), "Manaus": (27, 0),
    "Curitiba": (17, -1), "Porto Alegre": (19, -1), "Cordoba": (17, -1), "Rosario": (17, -1), "Mendoza": (16, -1),
    "Valparaiso": (14, -1), "Punta Arenas": (6, -1),
    # Oceania
    "Canberra": (13, -1), "Hobart": (12, -1), "Darwin": (28, 0), "Cairns": (25, 0), "Gold Coast": (21, -1),
    "Townsville": (25, 0), "Alice Springs": (21, -1), "Queenstown": (10, -1), "Dunedin": (11, -1),
    "Suva": (25, 0), "Noumea": (23, -1), "Port Moresby": (27, 0),
}
# Month offset from the annual mean in the northern hemisphere (January first).
_SEASON = (-8, -7, -4, 0, 4, 8, 10, 9, 5, 0, -4, -7)
CONDITIONS = ("sunny", "cloudy", "rain", "windy", "fog")


def close_city(name: str) -> str | None:
    """The table's city nearest to a misspelled ``name`` ("Warsawa", "W Warsaw", "warsaw"), if one is close."""
    folded = {c.casefold(): c for c in CITIES}
    match = difflib.get_close_matches(name.casefold(), folded, n=1, cutoff=0.75)
    return folded[match[0]] if match else None


def _known_city(city: str, what: str = "city") -> str:
    if city not in CITIES:
        near = close_city(city)
        if near:  # the way back for a caller that misspelled a name it was given
            raise ToolError(f"unknown {what} {city!r}; did you mean {near!r}?")
        # No example names: after "e.g. Oslo, Paris, Tokyo, Sydney" the demo's model answered with
        # that list, and one trained to retry with a suggested name asked about Paris (BENCHMARKS.md).
        raise ToolError(f"unknown {what} {city!r}: none of the table's {len(CITIES)} cities is spelled like it; "
                        "cities are named in English")
    return city


def get_weather(city: str, date: str) -> dict:
    _known_city(city)
    day = _date_in_year(date, "date")
    mean, hemisphere = CITIES[city]
    h = stable_int("weather", city, date)
    temp = mean + hemisphere * _SEASON[day.month - 1] + (h % 7) - 3
    condition = CONDITIONS[(h // 7) % len(CONDITIONS)]
    if condition == "rain" and temp <= 0:
        condition = "snow"
    return {"city": city, "condition": condition, "temp_c": temp}


# ----------------------------------------------------------------------------- dates


def date_diff(start: str, end: str) -> dict:
    """Days from ``start`` to ``end`` (negative when end is earlier)."""
    return {"days": (parse_date(end, "end") - parse_date(start, "start")).days}


# ----------------------------------------------------------------------------- grocery catalog

CATEGORIES = ("fruit", "vegetables", "dairy", "bakery", "pantry", "drinks")


def _product(sku: str, name: str, category: str, price: float, unit: str, stock: int) -> dict:
    return {"sku": sku, "name": name, "category": category, "price": price, "unit": unit, "stock": stock}


PRODUCTS: list[dict] = [
    _product("FR-101", "Green Apple", "fruit", 0.45, "each", 120),
    _product("FR-102", "Banana", "fruit", 0.25, "each", 200),
    _product("FR-103", "Mango", "fruit", 1.2, "each", 0),
    _product("FR-104", "Blueberries", "fruit", 3.5, "box", 40),
    _product("FR-105", "Lemon", "fruit", 0.6, "each", 85),
    _product("FR-106", "Pear", "fruit", 0.55, "each", 0),
    _product("VG-201", "Carrot", "vegetables", 0.9, "kg", 60),
    _product("VG-202", "Broccoli", "vegetables", 1.8, "each", 25),
    _product("VG-203", "Spinach", "vegetables", 2.2, "bag", 0),
    _product("VG-204", "Tomato", "vegetables", 2.9, "kg", 70),
    _product("VG-205", "Red Onion", "vegetables", 1.4, "kg", 55),
    _product("VG-206", "Potato", "vegetables", 1.1, "kg", 150),
    _product("DA-301", "Whole Milk", "dairy", 1.15, "liter", 90),
    _product("DA-302", "Oat Milk", "dairy", 2.49, "liter", 14),
    _product("DA-303", "Greek Yogurt", "dairy", 3.1, "tub", 0),
    _product("DA-304", "Cheddar Cheese", "dairy", 4.75, "block", 22),
    _product("DA-305", "Butter", "dairy", 2.95, "pack", 35),
    _product("DA-306", "Eggs", "dairy", 3.6, "dozen", 48),
    _product("BK-401", "Sourdough Bread", "bakery", 4.2, "loaf", 12),
    _product("BK-402", "Bagel", "bakery", 0.95, "each", 0),
    _product("BK-403", "Croissant", "bakery", 1.35, "each", 30),
    _product("BK-404", "Rye Bread", "bakery", 3.8, "loaf", 9),
    _product("BK-405", "Muffin", "bakery", 1.75, "each", 16),
    _product("BK-406", "Baguette", "bakery", 1.9, "each", 0),
    _product("PN-501", "Basmati Rice", "pantry", 5.4, "bag", 33),
    _product("PN-502", "Spaghetti", "pantry", 1.6, "pack", 80),
    _product("PN-503", "Olive Oil", "pantry", 8.9, "bottle", 0),
    _product("PN-504", "Honey", "pantry", 6.25, "jar", 18),
    _product("PN-505", "Rolled Oats", "pantry", 2.7, "bag", 41),
    _product("PN-506", "Peanut Butter", "pantry", 3.95, "jar", 27),
    _product("DR-601", "Orange Juice", "drinks", 3.3, "liter", 38),
    _product("DR-602", "Green Tea", "drinks", 4.1, "box", 0),
    _product("DR-603", "Coffee Beans", "drinks", 9.5, "bag", 19),
    _product("DR-604", "Sparkling Water", "drinks", 0.85, "bottle", 140),
    _product("DR-605", "Apple Juice", "drinks", 2.6, "liter", 44),
    _product("DR-606", "Cola", "drinks", 1.25, "bottle", 0),
    # A second shelf of each aisle, so the held-out quarter (every 4th) is a real test of copying.
    _product("FR-107", "Kiwi", "fruit", 0.5, "each", 64),
    _product("FR-108", "Pineapple", "fruit", 2.75, "each", 11),
    _product("FR-109", "Strawberries", "fruit", 3.9, "box", 0),
    _product("FR-110", "Red Grapes", "fruit", 4.3, "kg", 26),
    _product("FR-111", "Watermelon", "fruit", 5.5, "each", 7),
    _product("FR-112", "Peach", "fruit", 0.8, "each", 52),
    _product("FR-113", "Cherries", "fruit", 6.4, "box", 0),
    _product("FR-114", "Plum", "fruit", 0.65, "each", 38),
    _product("VG-207", "Cucumber", "vegetables", 0.75, "each", 44),
    _product("VG-208", "Zucchini", "vegetables", 2.1, "kg", 0),
    _product("VG-209", "Cauliflower", "vegetables", 2.4, "each", 19),
    _product("VG-210", "Sweet Corn", "vegetables", 0.7, "each", 66),
    _product("VG-211", "Garlic", "vegetables", 0.35, "each", 130),
    _product("VG-212", "Celery", "vegetables", 1.3, "each", 0),
    _product("VG-213", "Kale", "vegetables", 2.6, "bag", 21),
    _product("VG-214", "Pumpkin", "vegetables", 3.2, "each", 9),
    _product("DA-307", "Mozzarella", "dairy", 2.8, "ball", 31),
    _product("DA-308", "Sour Cream", "dairy", 1.9, "tub", 0),
    _product("DA-309", "Cottage Cheese", "dairy", 2.35, "tub", 17),
    _product("DA-310", "Feta", "dairy", 3.45, "block", 23),
    _product("DA-311", "Cream Cheese", "dairy", 2.2, "tub", 0),
    _product("DA-312", "Parmesan", "dairy", 7.8, "block", 13),
    _product("DA-313", "Ricotta", "dairy", 2.65, "tub", 8),
    _product("DA-314", "Kefir", "dairy", 2.3, "bottle", 29),
    _product("BK-407", "Brioche", "bakery", 3.4, "loaf", 0),
    _product("BK-408", "Ciabatta", "bakery", 2.05, "each", 15),
    _product("BK-409", "Pretzel", "bakery", 1.1, "each", 42),
    _product("BK-410", "Donut", "bakery", 1.2, "each", 0),
    _product("BK-411", "Pita Bread", "bakery", 1.85, "pack", 27),
    _product("BK-412", "Cinnamon Roll", "bakery", 2.25, "each", 18),
    _product("BK-413", "Scone", "bakery", 1.6, "each", 11),
    _product("BK-414", "Waffles", "bakery", 3.15, "pack", 0),
    _product("PN-507", "Brown Sugar", "pantry", 2.15, "bag", 36),
    _product("PN-508", "Sea Salt", "pantry", 1.45, "jar", 0),
    _product("PN-509", "Black Pepper", "pantry", 3.05, "jar", 24),
    _product("PN-510", "Lentils", "pantry", 2.4, "bag", 47),
    _product("PN-511", "Chickpeas", "pantry", 1.3, "can", 0),
    _product("PN-512", "Couscous", "pantry", 2.85, "box", 20),
    _product("PN-513", "Maple Syrup", "pantry", 7.25, "bottle", 12),
    _product("PN-514", "Quinoa", "pantry", 4.6, "bag", 15),
    _product("DR-607", "Lemonade", "drinks", 1.95, "bottle", 58),
    _product("DR-608", "Iced Coffee", "drinks", 2.45, "can", 0),
    _product("DR-609", "Ginger Ale", "drinks", 1.4, "can", 73),
    _product("DR-610", "Kombucha", "drinks", 3.25, "bottle", 16),
    _product("DR-611", "Root Beer", "drinks", 1.35, "can", 0),
    _product("DR-612", "Tonic Water", "drinks", 1.15, "bottle", 49),
    _product("DR-613", "Energy Drink", "drinks", 2.1, "can", 35),
    _product("DR-614", "Hot Chocolate", "drinks", 4.9, "box", 10),
]
_BY_SKU = {p["sku"]: p for p in PRODUCTS}
MAX_RESULTS = 6


def search_products(query: str = "", category: str | None = None) -> dict:
    """Products whose name contains every word of ``query`` (case-insensitive), optionally
    within one category. No match is an empty list, not an error: "we have none" is an answer."""
    words = query.lower().split()
    hits = [p for p in PRODUCTS
            if (category is None or p["category"] == category) and all(w in p["name"].lower() for w in words)]
    return {"results": [{"sku": p["sku"], "name": p["name"]} for p in hits[:MAX_RESULTS]]}


def get_product(sku: str) -> dict:
    if sku not in _BY_SKU:
        raise ToolError(f"no product has SKU {sku!r}; find SKUs with search_products")
    p = _BY_SKU[sku]
    return {"sku": sku, "name": p["name"], "price": p["price"], "unit": p["unit"], "in_stock": p["stock"]}


# ----------------------------------------------------------------------------- flights


def search_flights(origin: str, destination: str, date: str) -> dict:
    """Two or three flights for any route between known cities on a day of the table's year,
    cheapest first and counted, as fare search APIs list them; prices are distinct, so "the
    cheapest flight" always has one answer."""
    _known_city(origin, "origin")
    _known_city(destination, "destination")
    if origin == destination:
        raise ToolError("origin and destination are the same city")
    _date_in_year(date, "date")
    h = stable_int("flights", origin, destination, date)
    count = 2 + h % 2
    base = 90 + (stable_int("route", *sorted((origin, destination))) % 60) * 10
    # Fares 40 apart plus a jitter under 40 are distinct; rotating them over the departures
    # makes the cheapest flight any of the day's departures, not always the earliest.
    fares = [base + 40 * k + stable_int("fare", origin, destination, date, k) % 8 * 5 for k in range(count)]
    shift = (h // 2) % count
    flights = []
    for i in range(count):
        hi = stable_int("flight", origin, destination, date, i)
        flights.append({"flight": f"AT{100 + hi % 900}", "depart": f"{6 + 5 * i + hi % 4:02d}:{(hi // 4) % 4 * 15:02d}",
                        "price": fares[(i + shift) % count]})
    return {"count": count, "flights": sorted(flights, key=lambda f: f["price"])}


# ----------------------------------------------------------------------------- the tool list


# Schemas are rendered into every prompt, so they say only what the names do not: types,
# required fields, enums, patterns. Dates are "format": "date" (an annotation jsonschema does
# not enforce by default); the functions reject a malformed date with a ToolError instead.
DATE = {"type": "string", "format": "date"}
CITY = {"type": "string"}


def _params(properties: dict, required: list[str], **extra) -> dict:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False,
            **extra}


TOOLS: list[Tool] = [
    Tool("calculator", "Evaluate an arithmetic expression such as 12 * (3 + 4)",
         _params({"expression": {"type": "string"}}, ["expression"]), calculator),
    Tool("convert_units", "Convert a length, mass, volume or temperature",
         _params({"value": {"type": "number"}, "from_unit": {"type": "string", "enum": UNITS},
                  "to_unit": {"type": "string", "enum": UNITS}}, ["value", "from_unit", "to_unit"]),
         convert_units),
    Tool("get_weather", f"Weather of a city on a day of {YEAR}",
         _params({"city": CITY, "date": DATE}, ["city", "date"]), get_weather),
    Tool("date_diff", "Days from start to end",
         _params({"start": DATE, "end": DATE}, ["start", "end"]), date_diff),
    Tool("search_products", "Search the grocery catalog by name words and/or category",
         _params({"query": {"type": "string"}, "category": {"type": "string", "enum": list(CATEGORIES)}}, [],
                 minProperties=1),
         search_products),
    Tool("get_product", "Price and stock of a product",
         _params({"sku": {"type": "string", "pattern": r"^[A-Z]{2}-\d{3}$"}}, ["sku"]), get_product),
    Tool("search_flights", f"Flights between two cities on a day of {YEAR}, cheapest first",
         _params({"origin": CITY, "destination": CITY, "date": DATE}, ["origin", "destination", "date"]),
         search_flights),
]
TOOLS_BY_NAME: dict[str, Tool] = {t.name: t for t in TOOLS}
