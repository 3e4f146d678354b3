"""BitQ's optimiser core: the analytical performance term (DM model) and the exact allocation."""

from .dm_model import (  # noqa: F401
    BITQ_DRAM_COST_PER_BYTE, BITQ_ONCHIP_COST_PER_BYTE, CacheLevel, ConvShape, LayerCost,
    MemoryHierarchy, Tiling, best_tiling, bits_per_element, layer_cost, layer_cost_for_formats,
    layer_costs)
from .milp import default_lambdas, pareto_front, solve, uniform_allocations  # noqa: F401
from .problem import Allocation, AllocationProblem  # noqa: F401
from .accuracy import AccuracyTerm, Calibration, load_calibration, measure_accuracy_term, noise_power  # noqa: F401
from .candidates import CandidateSet, LayerCandidates, check_candidate  # noqa: F401
from .performance import PerformanceTerm, memory_hierarchy, performance_term  # noqa: F401
from .planner import Objective, PlanResult, Verification, plan_model, verify  # noqa: F401
