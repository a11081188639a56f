// TorchSharp's random generator is process-global; seeded tests must not interleave (see MinLora.Tests).
[assembly: CollectionBehavior(DisableTestParallelization = true)]
