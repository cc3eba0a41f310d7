"""`vbatt simulate` and `vbatt size`: the controller on a scenario, faster than real time."""

from vbatt.scenario.runner import RunResult, simulate
from vbatt.scenario.schema import Loaded, Scenario, load_scenario, load_scenario_text

__all__ = ["simulate", "RunResult", "load_scenario", "load_scenario_text", "Loaded", "Scenario"]
