"""seqshard: an auto-parallel compiler for long-sequence transformers.

    model → capture → dims → strategies → costmodel → planner (CP-SAT) → passes → codegen → runtime
"""

__version__ = "0.1.0"
