"""The engine's tunables, in one place (as stumpy's ``config``): tile sizes and thresholds.

Values were measured on the development machines (see the README's performance section); change
them here and every kernel, wrapper and block map follows.
"""

#: ``cpu`` backend: query rows per tile
CPU_BLOCK_Q = 64
#: ``cpu`` backend: query rows per tile when BLAS is held at one thread (heads up to 128 wide)
CPU_BIG_BLOCK_Q = 128
#: ``cpu`` backend: key rows per tile when BLAS is held at one thread, and the largest otherwise
CPU_BLOCK_K = 256
#: ``cpu`` backend: query rows per parallel task, split into tiles that share each key/value tile
CPU_TASK_ROWS = 256
#: ``cpu`` packed batches (``varlen_attention``): a tile that a causal or right-window diagonal
#: crosses computes the keys past its first row's last visible one in strips of this many query
#: rows, each up to its own last visible key (``kernels.cpu.varlen_rows.diagonal_split``)
CPU_DIAGONAL_STRIP = 32
#: ``cpu`` packed batches: query rows per parallel task for heads up to 64 wide (at least the dense
#: forward's; wider heads proportionally fewer), so that a task copies each key and value tile of
#: its sequence once for more query tiles (16 causal sequences of 1 to 512 tokens, E = 64: 4 %
#: faster than 256 rows on one thread); fewer where the tasks would fall under
#: ``CPU_MIN_TASKS_PER_THREAD`` per thread
CPU_VARLEN_TASK_ROWS = 512
#: ``cpu`` backend: rows per task shrink (to one tile at least) until each thread has this many
#: tasks (TBB balances them; fewer left a thread idle at the end of short calls)
CPU_MIN_TASKS_PER_THREAD = 4
#: ``cpu`` backend: heads up to this wide have their tiles measured per machine
#: (``engine.backends.cpu.autotune``); wider ones take the fixed rule
CPU_TUNE_MAX_WIDTH = 128
#: ``cpu`` backend: a forward call with at least this many multiply-adds (batch x heads x L x S x
#: (E + Ev)) measures its class's tiles when they are not known yet (about a second, once per
#: machine); smaller calls use what is known, else the fixed rule
CPU_TUNE_MIN_WORK = 1 << 28
#: ``cpu`` backend: a parallel forward call with at least this many multiply-adds first lets the
#: calling thread's idle GNU OpenMP workers (torch's) go, so they do not spin on its cores
#: (``engine.runtime.threads.quiet_openmp``; their runtime restarts them in tens of microseconds)
CPU_QUIET_OPENMP_MIN_WORK = 1 << 24
#: ``cpu`` backend: calls with at most this many multiply-adds (batch x heads x L x S x (E + Ev))
#: run the kernels' serial build: waking the thread pool costs more than splitting the work gains
CPU_SERIAL_MAX_WORK = 1 << 17
#: OpenBLAS runs a GEMM on one thread when m*n*k <= 65536 * GEMM_MULTITHREAD_THRESHOLD (4 by
#: default); above that it starts its own threads inside our parallel tasks and oversubscribes
#: the cores (3x slower at L = 4096). Without the BLAS pin, both products of a tile stay below it.
BLAS_SINGLE_THREAD_MNK = 65536 * 4

#: ``cpu`` backward: query rows per tile when BLAS is held at one thread (rounded down to a
#: multiple of the forward's; its key tiles are the forward's)
CPU_BWD_BLOCK_Q = 256
#: ``cpu`` backward: split each head's key tiles until batch x kv heads x splits is a multiple of
#: the thread count, or at least this many times the thread count (load balance)
CPU_BWD_MIN_TASKS_PER_THREAD = 4

#: default tile sizes of a ``BlockMask`` (the cpu kernel's usual tiles; other tile sizes are
#: derived from the mask_mod once and memoised on the block mask)
BLOCK_MASK_Q, BLOCK_MASK_K = CPU_BIG_BLOCK_Q, CPU_BLOCK_K

#: ``cuda`` backend: query rows per thread block (one thread each)
CUDA_BLOCK_Q = 128
#: ``cuda`` backend: shared memory for one key and value tile, in bytes
CUDA_TILE_SHARED_BYTES = 32 * 1024
#: ``cuda`` backend: upper bound on E + Ev (beyond it a key tile of 8 rows no longer fits)
CUDA_MAX_HEAD_SUM = 1024

#: ``engine.distributed``: rows of a query chunk when NumPy inputs are chunked for the user
#: (sequence axes in chunks of up to this many rows; heads, then batch entries, grouped until a
#: chunk holds about this many rows). 2048 rows of head 64 in float32 are 512 KiB; one (query
#: chunk, key chunk) task is then about 1 GFLOP, so Dask's per-task cost (about a millisecond)
#: stays small
DASK_CHUNK_ROWS = 2048
#: ``cpu`` decoding (``attention_with_kvcache``): keys per tile (a tile never crosses a page;
#: small pages are gathered into one tile)
DECODE_BLOCK_K = 256
#: ``cpu`` decoding: query rows (query heads of a key/value head x new tokens) per task
DECODE_BLOCK_ROWS = 128
#: ``cpu`` decoding: tasks with at most this many rows compute their dot products in the kernel,
#: reading each cache row once in place (16-bit rows widened on the fly); larger ones use GEMM on
#: tiles. OpenBLAS's GEMM with 4 rows took 9x the time of 1 row; its GEMV per row is no faster
#: than the kernel's own loops, which also skip the copy of 16-bit and paged tiles
DECODE_FUSED_ROWS = 8
#: ``cpu`` forward: a call with at most DECODE_FUSED_ROWS query rows per key head (L x group), in
#: float32/float64 at most this many query rows (L), and nothing the decode op lacks, runs on the
#: decode op (``backends.cpu.decode_route``). Measured on AMD Zen 4, 2 threads, S = 1024: float32
#: L = 1 2.2-2.5x faster there, L = 2 1.05-1.47x, L = 4 0.89-1.02x, L = 8 0.89x; 16-bit 2-9x
#: faster at every L up to 8 (the forward's 16-bit tiles pad a few rows to 32)
DECODE_ROUTE_FLOAT_ROWS = 2
#: ``cpu`` decoding: split-KV never gives a split fewer keys than this (the merge would cost more
#: than the parallelism gains)
DECODE_MIN_SPLIT_KEYS = 512
#: ``cpu`` decoding: the most splits ``num_splits=None`` picks
DECODE_MAX_SPLITS = 64
#: ``cpu`` backend: which tile-product providers ``auto`` takes, first installed first, per CPU
#: vendor (``vendor_id`` of /proc/cpuinfo). AMD Zen 3 (measured, docs/performance.md): SciPy's
#: OpenBLAS runs its AVX2 kernels at the machine's rate and MKL is no faster (0.7-0.85x in
#: float64), so ``numpy``. Intel (issue 17's report: torch, with MKL, 1.35x the engine with
#: OpenBLAS's SkylakeX kernels): MKL first. Other vendors: ``numpy``
GEMM_AUTO_ORDER = {"GenuineIntel": ("mkl", "openblas", "numpy"), "AuthenticAMD": ("numpy",)}
GEMM_AUTO_DEFAULT = ("numpy",)
#: ``calibrate`` (opt-in): time the installed candidates at the kernel's tile shapes once per
#: process and dtype (thread CPU time, best of GEMM_CALIBRATION_BLOCKS blocks of
#: GEMM_CALIBRATION_CALLS calls), keep the fastest; so does the measured ``auto`` choice
#: (``backends.cpu.autotune``). Both go through ``gemm_providers.choose_fastest``: ``numpy`` (no
#: extra library) is kept unless another is faster by more than GEMM_CALIBRATION_MARGIN, and where
#: it is kept, ``openblas`` replaces it if at least as fast as ``numpy``; the engine's own ``fma``
#: must beat every library by more than the margin (on small tiles the libraries are faster).
#: ``openblas`` (``scipy-openblas32``) is the library NumPy and SciPy bundle, a newer build loaded
#: for the engine alone and sequential: on AMD Zen 4 (2 cores, 2026-12-07) it tied ``numpy``
#: serially at head 64 (6.47 against 6.61-6.65 ms on the tuning problem) and took 0-7% less at 2
#: threads on the float32 cases of issue 29 (docs/performance.md); on an Intel Xeon it was 7%
#: faster serially (4.00 against 4.31 ms,
#: bench/results/cpu-vs-torch-intel-xeon-f6-m167-2026-12-06-session8.json); on AMD Zen 3 its
#: products ran at 0.93-0.98x of ``numpy``'s (2026-11-29), which this rule leaves on ``numpy``.
GEMM_CALIBRATION_CANDIDATES = ("numpy", "openblas", "mkl", "fma")
GEMM_CALIBRATION_BLOCKS = 5
GEMM_CALIBRATION_CALLS = 8
GEMM_CALIBRATION_MARGIN = 0.03
#: 16-bit inputs go through MKL's mixed-precision GEMMs (16-bit operands, float32 accumulation)
#: where the CPU has one of these flags (AMX or AVX-512 16-bit dot products: ``auto``), or where
#: the ``mkl`` provider is forced; otherwise they are widened to float32 once and take the
#: float32 kernel (elsewhere MKL emulates the 16-bit GEMM, slower than float32)
GEMM_HALF_CPU_FLAGS = {"bfloat16": ("amx_bf16", "avx512_bf16"), "float16": ("amx_fp16", "avx512_fp16")}
#: ``cuda`` decoding (``attention_with_kvcache``): threads per thread block of the split-KV kernel
CUDA_DECODE_THREADS = 128
#: ``cuda`` decoding: query rows (query heads of a cache head x new tokens) per thread block; a
#: decode step of a GQA group up to 8 wide is one block, so each cache tile is read once per group
CUDA_DECODE_BLOCK_ROWS = 8
#: ``cuda`` decoding: shared memory one block may use (query rows, one key and one value tile,
#: scores, accumulators), in bytes; key tiles are as long as fit, a multiple of 8, at most 64 keys
CUDA_DECODE_SHARED_BYTES = 44 * 1024
#: ``cuda`` decoding: streaming multiprocessors assumed by ``num_splits=None`` when no GPU can be
#: asked (the simulator, or choosing before a GPU is present): an H100/H200 SXM has 132
CUDA_DECODE_DEFAULT_SMS = 132
