"""What the engine needs from the process it runs in: tunables (``config``), threads, the JIT cache,
GEMM providers, the machine description and the exception types."""
