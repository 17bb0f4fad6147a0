"""mlo: bilevel and multilevel optimization for PyTorch.

A method is a graph of :class:`Problem` nodes run by an :class:`Engine`, which
computes hypergradients by unrolled, implicit (Neumann, CG) or finite-difference
best-response Jacobians — any of them at any level.
"""
from . import callbacks, checkpoint, loggers
from .callbacks import Callback
from .config import EngineConfig, ProblemConfig, load_problem_configs
from .engine import Engine
from .graph import Graph, GraphError
from .problem import Problem
from .window import WindowProblem

__all__ = ["Problem", "WindowProblem", "ProblemConfig", "Engine", "EngineConfig", "Graph", "GraphError",
           "load_problem_configs", "checkpoint", "callbacks", "loggers", "Callback"]
__version__ = "0.1.0"
