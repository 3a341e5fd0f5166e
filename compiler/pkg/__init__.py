"""layoutc: compile engine state layouts into verified heterogeneous-TP transfer plans."""

__version__ = "0.1.0"
