"""The bundled demo tools: exact results, schema failures, and a calculator that never runs code."""

import json

import jsonschema
import pytest

from agenttune.demo_tools import CITIES, PRODUCTS, TOOLS, TOOLS_BY_NAME
from agenttune.tools import ToolError, load_tools


def run(name: str, **arguments):
    """Call a tool the way the agent loop does (validate, run, observation text) and parse it."""
    return json.loads(TOOLS_BY_NAME[name](arguments))


def error(name: str, **arguments) -> str:
    with pytest.raises(ToolError) as info:
        TOOLS_BY_NAME[name](arguments)
    return str(info.value)


# ----------------------------------------------------------------------------- the tool list


def test_tools_module_loads_and_schemas_are_strict():
    assert set(load_tools(["agenttune.demo_tools"])) == set(TOOLS_BY_NAME) == {
        "calculator", "convert_units", "get_weather", "date_diff", "search_products", "get_product",
        "search_flights"}
    for tool in TOOLS:
        schema = tool.parameters
        jsonschema.validators.validator_for(schema).check_schema(schema)
        assert schema["type"] == "object" and schema["additionalProperties"] is False, tool.name
        assert set(schema["required"]) <= set(schema["properties"]), tool.name
        # react_system_prompt appends "." after the description
        assert tool.description and not tool.description.endswith("."), tool.name


@pytest.mark.parametrize("name, arguments, where", [
    ("get_weather", {"city": "Oslo"}, "'date' is a required property"),
    ("get_weather", {"city": "Oslo", "date": "2025-01-01", "unit": "F"}, "Additional properties"),
    ("convert_units", {"value": "12", "from_unit": "km", "to_unit": "mi"}, "at value"),
    ("convert_units", {"value": 1, "from_unit": "parsec", "to_unit": "km"}, "at from_unit"),
    ("search_products", {}, "non-empty"),
    ("search_products", {"category": "toys"}, "at category"),
    ("get_product", {"sku": "da-302"}, "at sku"),
    ("calculator", {"expression": 12}, "at expression"),
])
def test_schema_violations_are_tool_errors(name, arguments, where):
    message = error(name, **arguments)
    assert message.startswith(f"invalid arguments for {name}") and where in message


# ----------------------------------------------------------------------------- calculator


@pytest.mark.parametrize("expression, result", [
    ("12 * (3 + 4)", 84), ("7 / 2", 3.5), ("6 / 3", 2), ("7 / 3", 2.333333), ("-3 + -2", -5),
    ("2 ** 10", 1024), ("17 // 5", 3), ("17 % 5", 2), ("645 * 4", 2580), ("4.83 + 8", 12.83), ("0.1 + 0.2", 0.3),
])
def test_calculator_arithmetic(expression, result):
    assert run("calculator", expression=expression) == {"result": result}
    assert type(run("calculator", expression=expression)["result"]) is type(result)


@pytest.mark.parametrize("expression, message", [
    ("__import__('os')", "only numbers"),
    ("().__class__.__bases__", "only numbers"),
    ("open('x').read()", "only numbers"),
    ("x + 1", "only numbers"),
    ("[1, 2]", "only numbers"),
    ("lambda: 1", "only numbers"),
    ("'a' * 3", "only numbers"),
    ("True + 1", "only numbers"),
    ("2 ^ 3", "write ** for powers"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("9 ** 9 ** 9", "exponent"),
    ("((10 ** 64) ** 64) ** 64", "exceeds 1e100"),
    ("1e300 * 1e300", "exceeds 1e100"),
    ("(-8) ** 0.5", "not a finite real number"),
    ("3 +", "cannot parse"),
    ("1" * 201, "longer than 200"),
])
def test_calculator_refuses(expression, message):
    assert message in error("calculator", expression=expression)


def test_calculator_never_executes_code(tmp_path):
    marker = tmp_path / "pwned"
    for expression in (f"__import__('os').system('touch {marker}')", f"open('{marker}', 'w')"):
        with pytest.raises(ToolError):
            TOOLS_BY_NAME["calculator"]({"expression": expression})
    assert not marker.exists()


# ----------------------------------------------------------------------------- units, dates


@pytest.mark.parametrize("value, from_unit, to_unit, result", [
    (12, "km", "mi", 7.46), (3, "mi", "km", 4.83), (10, "kg", "lb", 22.05), (3, "C", "F", 37.4),
    (212, "F", "C", 100), (0, "C", "K", 273.15), (1, "gal", "l", 3.79), (5, "in", "cm", 12.7),
    (250, "g", "oz", 8.82), (500, "ml", "l", 0.5), (1, "cm", "mi", 0.0),
])
def test_convert_units(value, from_unit, to_unit, result):
    assert run("convert_units", value=value, from_unit=from_unit, to_unit=to_unit) == {"value": result, "unit": to_unit}


@pytest.mark.parametrize("from_unit, to_unit", [("km", "kg"), ("C", "m"), ("l", "F")])
def test_convert_units_across_dimensions(from_unit, to_unit):
    assert "cannot convert" in error("convert_units", value=1, from_unit=from_unit, to_unit=to_unit)


@pytest.mark.parametrize("start, end, days", [
    ("2025-01-03", "2025-02-14", 42), ("2024-02-28", "2024-03-01", 2), ("2025-02-28", "2025-03-01", 1),
    ("2025-03-01", "2025-01-01", -59), ("2025-06-01", "2025-06-01", 0),
])
def test_date_diff(start, end, days):
    assert run("date_diff", start=start, end=end) == {"days": days}


def test_date_diff_rejects_bad_dates():
    assert "write YYYY-MM-DD" in error("date_diff", start="2025-02-30", end="2025-03-01")
    assert "write YYYY-MM-DD" in error("date_diff", start="tomorrow", end="2025-03-01")


# ----------------------------------------------------------------------------- weather, flights


def test_weather_is_a_fixed_table():
    first = run("get_weather", city="Oslo", date="2025-01-05")
    assert first == run("get_weather", city="Oslo", date="2025-01-05")
    assert set(first) == {"city", "condition", "temp_c"} and first["city"] == "Oslo"
    seen = set()
    for city in CITIES:
        for date in ("2025-01-15", "2025-07-15", "2025-10-03"):
            w = run("get_weather", city=city, date=date)
            seen.add(w["condition"])
            assert isinstance(w["temp_c"], int) and -30 < w["temp_c"] < 45
            assert w["condition"] != "snow" or w["temp_c"] <= 0
    assert {"sunny", "cloudy", "rain", "windy", "fog"} <= seen
    # seasons: northern cities are colder in January than in July, southern ones the reverse
    assert run("get_weather", city="Oslo", date="2025-01-15")["temp_c"] < run(
        "get_weather", city="Oslo", date="2025-07-15")["temp_c"]
    assert run("get_weather", city="Sydney", date="2025-01-15")["temp_c"] > run(
        "get_weather", city="Sydney", date="2025-07-15")["temp_c"]


def test_weather_unknown_city_and_date():
    message = error("get_weather", city="Qwxyz", date="2025-01-05")
    assert "unknown city 'Qwxyz'" in message and "did you mean" not in message
    assert not [city for city in CITIES if city in message]  # no name to take for a suggestion
    assert "outside the table" in error("get_weather", city="Oslo", date="2024-12-31")
    assert "write YYYY-MM-DD" in error("get_weather", city="Oslo", date="05/01/2025")


def test_flights_are_deterministic_counted_and_cheapest_first():
    result = run("search_flights", origin="Oslo", destination="Rome", date="2025-04-05")
    assert result == run("search_flights", origin="Oslo", destination="Rome", date="2025-04-05")
    cheapest_departures = set()
    for origin, destination in [("Oslo", "Rome"), ("Tokyo", "Lima"), ("Paris", "Cairo"), ("Seoul", "Perth")]:
        for day in range(1, 29, 3):
            result = run("search_flights", origin=origin, destination=destination, date=f"2025-05-{day:02d}")
            flights = result["flights"]
            assert result["count"] == len(flights) and 2 <= len(flights) <= 3
            prices = [f["price"] for f in flights]
            assert prices == sorted(set(prices))  # distinct, cheapest first
            assert all(f["flight"].startswith("AT") and len(f["depart"]) == 5 for f in flights)
            cheapest_departures.add(sorted(f["depart"] for f in flights).index(flights[0]["depart"]))
    assert len(cheapest_departures) >= 2  # the cheapest is not always the earliest departure


def test_flights_bad_routes():
    assert "unknown destination 'Gotham'" in error("search_flights", origin="Oslo", destination="Gotham",
                                                   date="2025-04-05")
    assert "same city" in error("search_flights", origin="Oslo", destination="Oslo", date="2025-04-05")


# ----------------------------------------------------------------------------- grocery


def test_product_search_and_lookup():
    assert run("search_products", query="milk") == {"results": [
        {"sku": "DA-301", "name": "Whole Milk"}, {"sku": "DA-302", "name": "Oat Milk"}]}
    assert run("search_products", query="OAT MILK") == {"results": [{"sku": "DA-302", "name": "Oat Milk"}]}
    assert run("search_products", query="juice", category="drinks")["results"] == [
        {"sku": "DR-601", "name": "Orange Juice"}, {"sku": "DR-605", "name": "Apple Juice"}]
    assert [p["sku"] for p in run("search_products", category="dairy")["results"]] == [
        f"DA-30{i}" for i in range(1, 7)]
    assert run("search_products", query="caviar") == {"results": []}
    assert run("get_product", sku="DA-302") == {"sku": "DA-302", "name": "Oat Milk", "price": 2.49,
                                                "unit": "liter", "in_stock": 14}
    assert "no product has SKU 'ZZ-999'" in error("get_product", sku="ZZ-999")


def test_every_product_name_finds_exactly_itself():
    """The price task searches by full name and takes the first hit; that must be the product."""
    for p in PRODUCTS:
        hits = run("search_products", query=p["name"])["results"]
        assert hits[0]["sku"] == p["sku"], p["name"]


@pytest.mark.parametrize("name, meant", [("Warsawa", "Warsaw"), ("W Warsaw", "Warsaw"), ("warsaw", "Warsaw"),
                                         ("Bussels", "Brussels"), ("Sao Paolo", "Sao Paulo")])
def test_a_misspelled_city_gets_the_table_name(name, meant):
    """The error names the city a caller most likely meant, for get_weather and search_flights alike."""
    assert error("get_weather", city=name, date="2025-01-05") == f"unknown city {name!r}; did you mean {meant!r}?"
    assert f"unknown origin {name!r}; did you mean {meant!r}?" in error(
        "search_flights", origin=name, destination="Oslo", date="2025-01-05")
