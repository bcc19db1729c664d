# Allocator settings for training processes; sourced by `make train` and the launch scripts
# (the values are read when a process starts, so they must be in its environment; the trainer
# applies the same through mallopt once it is built: trainer.allocator, recsys_moe/allocator.py).
#
# A step allocates and frees its activations (tens of MiB at batch 8192); by default glibc hands
# big blocks back to the kernel, so every step page-faults them in again. These keep freed
# memory in the process (README, "Benchmarks": 2.6x-5.8x fewer page faults, batch-8192 samples/s
# up 7-20%). The cost: memory freed after a peak stays with the process (up to the trim
# threshold) instead of going back to the OS.
#   glibc.malloc.mmap_threshold=32 MiB (glibc's maximum): smaller blocks come from the heap;
#   glibc.malloc.trim_threshold=1 GiB: freed heap memory below that is not returned to the OS;
#   glibc.malloc.top_pad=256 MiB: the heap grows in big steps.
#
# A value you set yourself wins; set it to the empty string for glibc's defaults, e.g.
#   GLIBC_TUNABLES= launch/torchrun_single_node.sh trainer.allocator=default
# (the trainer leaves the allocator alone whenever GLIBC_TUNABLES is set, even empty).
# Not set here: THP_MEM_ALLOC_ENABLE=1 (torch's blocks of 2 MiB and more in transparent huge
# pages). It cut page faults a further 1.7x and sped a dense batch-8192 loop up 8-19%, but made the
# sparse MoE layer 1.35x-1.6x slower where the kernel compacts memory to find huge pages
# (/sys/kernel/mm/transparent_hugepage/defrag = madvise); try it on your hosts.
export GLIBC_TUNABLES=${GLIBC_TUNABLES-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824:glibc.malloc.top_pad=268435456}
