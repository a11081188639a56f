// The MPI tests start several processes on a 2-core machine: one test at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
