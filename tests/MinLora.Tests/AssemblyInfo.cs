// TorchSharp's random generator is process-global: tests that re-seed it to reproduce a dropout mask (or that
// compare two seeded runs) must not interleave with other tests drawing random numbers, so test classes run one at
// a time. libtorch parallelises each operation over the cores anyway.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
