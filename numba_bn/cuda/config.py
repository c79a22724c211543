"""Launch sizes of the CUDA kernels, read at every call (tests shrink them to span many blocks).

The merge order inside a channel follows the launch shape, so results are deterministic for
given sizes; changing a size may change the last bits of a result, never its accuracy.
"""

# Threads of one block, for reductions and elementwise passes; a power of two <= MAX_THREADS.
THREADS_PER_BLOCK = 256

# Channels side by side in one block of the rows layout (inner == 1): 32 consecutive channels
# make one warp's loads one coalesced row segment. Must divide THREADS_PER_BLOCK.
ROW_TILE = 32

# Most blocks that cooperate on one channel (tile) of a reduction; the last of them to finish
# merges their partial statistics.
BLOCKS_PER_CHANNEL = 256

# Values each thread should reduce before a channel gets another block: enough to hide the
# cost of the partials and of the cross-block merge.
VALUES_PER_THREAD = 16

# Blocks a reduction launch aims for, so that a few channels still fill every SM.
TARGET_BLOCKS = 1024

# Values each thread writes in the elementwise passes: enough to hide a thread's index
# arithmetic (on an H200, 784 MiB planes: eval at 27% of a copy's bandwidth with 4, 43% with
# 16, the same bits; benchmarks/gpu_launch_sizes.py).
ELEMENTWISE_VALUES_PER_THREAD = 16

# Upper bound of THREADS_PER_BLOCK: the size of the static shared-memory merge buffers (three
# float64 arrays, 12 KiB a block); fixed when the kernels compile, unlike the sizes above.
MAX_THREADS = 512
