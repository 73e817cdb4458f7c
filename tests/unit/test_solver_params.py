"""Solver parameters are typed (one pydantic model per solver, as the sensitivity methods have), every solver
call has a time limit, and a problem with NaN or infinity in it is refused before any search starts.

The API part runs the app in-process on SQLite with jobs not run (``app.state.enqueue`` appends to a list)."""

from __future__ import annotations

import json
import math
import random
import time

import pytest
from fastapi.testclient import TestClient

from bitplan.cli import main
from bitplan.errors import BitplanError
from bitplan.schemas import Budget, PlanRequest
from bitplan.settings import load_settings
from service.app import create_app
from solver import SOLVERS, Layer, NonFiniteError, Option, Problem, get_info, get_solver, parse_solver_params, solver_params
from storage import Database

FAMILY = ("ilp", "pareto", "evolutionary", "greedy", "uniform", "lagrange")


# --- the API ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory, digits_files):
    settings = load_settings(data_dir=str(tmp_path_factory.mktemp("solver_params") / "data"))
    db = Database(settings.database_url)
    db.migrate()
    key = db.create_key("vision")
    app = create_app(settings, worker=False, reconcile=False)
    sent: list[str] = []
    with TestClient(app) as client:
        app.state.enqueue = sent.append  # no job runs
        client.headers["Authorization"] = f"Bearer {key}"
        r = client.post("/v1/models", files={"file": ("digits.pt2", digits_files["pt2"].read_bytes())})
        assert r.status_code == 201, r.text
        yield client, r.json()["id"], sent


@pytest.mark.parametrize(("method", "params", "words"), [
    ("ilp", {"time_limit": "abc"}, "solver 'ilp' parameter time_limit: Input should be a valid number"),
    ("ilp", {"time_limit": -1}, "solver 'ilp' parameter time_limit: Input should be greater than 0 (got -1)"),
    ("ilp", {"backend": "gurobi"}, "solver 'ilp' parameter backend: Input should be 'cbc' or 'highs'"),
    ("evolutionary", {"evaluate": "x"}, "solver 'evolutionary' has no parameter(s) evaluate"),
    ("evolutionary", {"trials": 2.5}, "solver 'evolutionary' parameter trials"),
    ("pareto", {"max_states": 10**12}, "solver 'pareto' parameter max_states: Input should be less than or equal to"),
    ("greedy", {"fill": "sometimes"}, "solver 'greedy' parameter fill"),
])
def test_bad_solver_params_are_refused_at_submit_naming_the_field(api, method, params, words):
    client, model_id, sent = api
    before = len(sent)
    r = client.post("/v1/jobs", json={"model_id": model_id, "budgets": {"avg_weight_bits": 4},
                                      "solver": {"method": method, "params": params}})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "bad_params" and error["field"] == "solver" and words in error["message"], error
    if "has no parameter" in words:  # the valid ones are listed, with their ranges and defaults
        assert "valid parameters of solver 'evolutionary': trials (>=1, <=100000, default 200), seed" in error["hint"]
        assert "(evaluate: a Python callable, never a parameter; see 'measured')" in error["hint"]
    assert len(sent) == before  # nothing queued


def test_good_solver_params_are_accepted_and_stored(api):
    client, model_id, sent = api
    for method, params in (("ilp", {"time_limit": 5, "backend": "highs"}), ("evolutionary", {"measured": False, "trials": 20}),
                           ("pareto", {"cost_key": "size_bytes", "points": None}), ("uniform", {"time_limit": 0.5})):
        r = client.post("/v1/jobs", json={"model_id": model_id, "budgets": {"avg_weight_bits": 4},
                                          "solver": {"method": method, "params": params}})
        assert r.status_code == 202, r.text
        assert r.json()["request"]["solver"] == {"method": method, "params": params}
        assert sent[-1] == r.json()["id"]


def test_methods_list_each_solver_with_a_json_schema_and_no_callable(api):
    client, _, _ = api
    body = client.get("/v1/methods").json()
    assert [s["name"] for s in body["solvers"]] == list(SOLVERS)
    for entry in body["solvers"]:
        schema, defaults = entry["params"], entry["defaults"]
        assert entry["summary"] and schema["type"] == "object" and schema["additionalProperties"] is False
        assert list(schema["properties"])[-1] == "time_limit" and defaults["time_limit"] is None
        assert "evaluate" not in schema["properties"] and "evaluate" not in defaults
        assert set(defaults) == set(schema["properties"]) == set(solver_params(entry["name"]))
        assert all(schema["properties"][k].get("description") for k in defaults), entry["name"]
        assert "<function" not in json.dumps(entry)
    evolutionary = next(s for s in body["solvers"] if s["name"] == "evolutionary")
    assert evolutionary["defaults"]["measured"] is True
    ilp = next(s for s in body["solvers"] if s["name"] == "ilp")
    assert ilp["params"]["properties"]["backend"]["enum"] == ["cbc", "highs"]


# --- the registry -----------------------------------------------------------------------------------------


def test_parse_solver_params_names_the_field_and_what_it_expects():
    with pytest.raises(BitplanError) as err:
        parse_solver_params("ilp", {"time_limit": "abc"})
    assert err.value.message.startswith("solver 'ilp' parameter time_limit: Input should be a valid number")
    assert err.value.message.endswith("(got 'abc')") and "seconds" in err.value.hint
    with pytest.raises(BitplanError, match="finite number"):
        parse_solver_params("ilp", {"time_limit": math.inf})
    with pytest.raises(BitplanError) as err:
        parse_solver_params("greedy", {"evaluate": "x", "colour": 1})
    assert "evaluate" in err.value.message and "colour" in err.value.message
    assert err.value.hint.startswith("valid parameters of solver 'greedy': fill (")
    assert "time_limit (>0, <=604800, default None)" in err.value.hint
    with pytest.raises(BitplanError, match="valid solvers"):
        parse_solver_params("annealing", {})
    parsed = parse_solver_params("evolutionary", {"trials": "30", "measured": "false", "costs": ["bops"]})
    assert (parsed.trials, parsed.measured, parsed.costs, parsed.time_limit) == (30, False, ["bops"], None)
    with pytest.raises(Exception):  # noqa: B017 - frozen
        parsed.trials = 3


def test_evaluate_is_a_python_argument_only():
    problem = random_problem(0, layers=6)
    seen = []

    def evaluate(choices):
        seen.append(1)
        return sum(o.objective for o in choices.values())

    solution = get_solver("evolutionary")(problem, trials=12, population=4, evaluate=evaluate, measured=False)
    assert seen and problem.feasible(solution.choices)
    with pytest.raises(BitplanError, match="has no parameter"):
        get_solver("ilp")(problem, evaluate=evaluate)  # only the evolutionary solver takes it
    with pytest.raises(BitplanError, match="Input should be a valid boolean"):
        get_solver("evolutionary")(problem, measured="maybe")


# --- the CLI ----------------------------------------------------------------------------------------------


def test_cli_solve_refuses_a_bad_solver_param_in_one_line(tmp_path, capsys):
    path = tmp_path / "problem.json"
    path.write_text(Problem(random_problem(1, layers=4).layers, {"avg_weight_bits": 5}).to_json())
    assert main(["solve", str(path), "--solver-param", "time_limit=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitplan: error: solver 'ilp' parameter time_limit: Input should be a valid number") and "\n" not in err
    assert main(["solve", str(path), "--solver", "greedy", "--solver-param", "fill=2"]) == 2
    assert "solver 'greedy' parameter fill" in capsys.readouterr().err
    assert main(["solve", str(path), "--solver", "greedy", "--solver-param", "time_limit=5"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "heuristic"


def test_cli_plan_refuses_a_bad_solver_param_before_loading_the_model(tmp_path, capsys):
    start = time.perf_counter()
    code = main(["plan", str(tmp_path / "not_read.pt2"), "--budget", "avg_weight_bits=4", "--solver-param", "time_limit=abc"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith("bitplan: error: solver 'ilp' parameter time_limit: Input should be a valid number"), err
    assert main(["plan", str(tmp_path / "not_read.pt2"), "--budget", "avg_weight_bits=4", "--solver", "evolutionary",
                 "--solver-param", "evaluate=print"]) == 2
    assert "solver 'evolutionary' has no parameter(s) evaluate" in capsys.readouterr().err
    assert time.perf_counter() - start < 5


# --- finite inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_a_nan_problem_is_refused_fast_by_every_solver(tmp_path, capsys, name):
    raw = random_problem(2, layers=40).to_dict()
    raw["layers"][3]["options"][0]["objective"] = math.nan  # json writes NaN, as a hostile or broken file would
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(raw))
    assert main(["solve", str(path), "--solver", name]) == 2
    err = capsys.readouterr().err.strip()
    bits = raw["layers"][3]["options"][0]["w_bits"]
    assert err == (f"bitplan: error: layer l3, {bits}-bit option: objective is nan (the sensitivity scores contain "
                   "NaN or infinity; check the calibration data)")
    # fast: refused as the problem is read, before any solver runs (a wall-clock bound here was flaky under load)
    from solver.problem import NonFiniteError, Problem

    with pytest.raises(NonFiniteError, match="objective is nan"):
        Problem.from_dict(raw)


@pytest.mark.parametrize(("change", "words"), [
    (lambda raw: raw["layers"][0]["options"][1].update(objective=-math.inf), "layer l0, 3-bit option: objective is -inf"),
    (lambda raw: raw["layers"][5]["options"][2]["cost"].update(bops=math.nan), "layer l5, 4-bit option: cost bops is nan"),
    (lambda raw: raw["budgets"].update(size_bytes=math.inf), "budget size_bytes is inf"),
    (lambda raw: raw.update(fixed_cost={"size_bytes": math.nan}), "fixed cost size_bytes is nan"),
    (lambda raw: raw.update(max_objective=math.nan), "max_objective is nan"),
])
def test_non_finite_values_anywhere_in_a_problem_are_named(change, words):
    raw = random_problem(3, layers=8).to_dict()
    change(raw)
    with pytest.raises(BitplanError) as err:
        Problem.from_dict(raw)
    assert err.value.message == words


def test_non_finite_objective_is_a_data_error():
    with pytest.raises(NonFiniteError) as err:
        Problem((Layer("conv1", 10, (Option(2, objective=math.nan), Option(8))),), {"avg_weight_bits": 4})
    assert err.value.code == "bad_data"
    assert err.value.one_line() == ("layer conv1, 2-bit option: objective is nan (the sensitivity scores contain NaN or "
                                    "infinity; check the calibration data)")


# --- time limits ------------------------------------------------------------------------------------------


def random_problem(seed: int, layers: int = 300, widths=(2, 3, 4, 5, 6, 8)) -> Problem:
    """Random objectives and costs (no structure to exploit) and two budgets at a quarter of their range:
    at 300 layers x 6 options CBC needs several seconds to prove the optimum."""
    rnd = random.Random(seed)
    rows = tuple(Layer(f"l{i}", 1, tuple(
        Option(w, objective=float(rnd.randint(0, 1000)),
               cost={"size_bytes": float(rnd.randint(1, 1000)), "bops": float(rnd.randint(1, 1000))}) for w in widths))
        for i in range(layers))
    free = Problem(rows, {})
    budgets = {k: free.minimum(k) + 0.25 * (sum(max(o.cost[k] for o in lay.options) for lay in rows) - free.minimum(k))
               for k in ("size_bytes", "bops")}
    return Problem(rows, budgets)


@pytest.mark.parametrize(("name", "params", "statuses"), [
    ("ilp", {}, {"time_limit", "optimal"}),
    ("ilp", {"backend": "highs"}, {"time_limit", "optimal"}),
    ("pareto", {"cost_key": "size_bytes"}, {"time_limit", "optimal"}),
    ("evolutionary", {"trials": 100_000}, {"time_limit"}),
    ("greedy", {}, {"heuristic", "time_limit"}),
])
def test_every_solver_stops_at_its_time_limit(name, params, statuses):
    problem = random_problem(0)
    parsed = parse_solver_params(name, {"time_limit": 1, **params})
    start = time.perf_counter()
    solution = get_info(name).run(problem, parsed)
    took = time.perf_counter() - start
    assert solution.status in statuses and problem.feasible(solution.choices)
    assert took < 3.0, took


def test_uniform_takes_a_time_limit_too():
    problem = Problem(random_problem(0, layers=20).layers, {"avg_weight_bits": 8})
    assert get_solver("uniform")(problem, time_limit=1).status == "heuristic"


def test_exact_pareto_out_of_time_says_so():
    with pytest.raises(BitplanError, match="not traced within time_limit=0.2 s"):
        get_solver("pareto")(random_problem(0), cost_key="size_bytes", method="exact", time_limit=0.2)


def test_the_lagrangian_lp_gets_highs_time_limit(monkeypatch):
    import solver.ilp as ilp

    made = []
    original = ilp._new_highs

    def recording():
        made.append(original())
        return made[-1]

    monkeypatch.setattr(ilp, "_new_highs", recording)
    problem = random_problem(0, layers=40)
    options = {lay.name: problem.candidates(lay) for lay in problem.layers}
    lam = ilp.lagrangian_multipliers(problem, options, time_limit=7.5)
    assert all(v >= 0 and math.isfinite(v) for v in lam.values())
    assert made[0].getOptionValue("time_limit")[1] == pytest.approx(7.5)
    made.clear()
    ilp.solve_ilp(problem, time_limit=20, backend="highs")
    assert made and 0 < made[0].getOptionValue("time_limit")[1] <= 20  # the LP inside solve_ilp: what is left


# --- make_plan merges the run's limit with the solver's ----------------------------------------------------


def plan_request(solver="ilp", params=None, limit=None) -> PlanRequest:
    return PlanRequest(model="m.pt2", budget=Budget(avg_weight_bits=4), solver=solver, solver_params=params or {},
                       time_limit_s=limit)


@pytest.mark.parametrize(("params", "limit", "elapsed", "expected"), [
    ({}, None, 0.0, None),
    ({"time_limit": 30}, None, 0.0, 30),
    ({}, 600, 0.0, 600),
    ({"time_limit": 30}, 600, 0.0, 30),
    ({"time_limit": 900}, 600, 0.0, 600),
    ({"time_limit": 900}, 600, 100.0, 500),  # what is left of the run's limit
    ({}, 600, 650.0, 1.0),  # never less than a second, so a plan still comes back
])
def test_make_plan_uses_the_smaller_time_limit(params, limit, elapsed, expected):
    from bitplan.core.pipeline import solver_params_for

    merged = solver_params_for(plan_request(params=params, limit=limit), elapsed)
    assert merged.time_limit == expected
    assert merged.model_dump(exclude={"time_limit"}) == parse_solver_params("ilp", params).model_dump(exclude={"time_limit"})


def test_make_plan_refuses_bad_solver_params_before_loading(tmp_path):
    from bitplan.core.pipeline import make_plan, solver_params_for

    assert solver_params_for(plan_request("evolutionary", {"measured": False}, 10)).measured is False
    with pytest.raises(BitplanError, match="solver 'ilp' parameter time_limit"):
        make_plan(plan_request(params={"time_limit": "abc"}).model_copy(update={"model": str(tmp_path / "absent.pt2")}))
    with pytest.raises(ValueError):
        plan_request(limit=-5)
