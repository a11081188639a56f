namespace MinLora.Distributed;

/// <summary>A data-parallel job cannot continue: MPI failed, could not be loaded, or the ranks disagree.</summary>
public class DistributedException : Exception
{
    /// <summary>Creates the exception.</summary>
    public DistributedException() { }

    /// <summary>Creates the exception with a message.</summary>
    /// <param name="message">What went wrong.</param>
    public DistributedException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and a cause.</summary>
    /// <param name="message">What went wrong.</param>
    /// <param name="inner">The cause.</param>
    public DistributedException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>A collective operation did not complete in time: another rank died, hangs, or runs different code.</summary>
public class DistributedTimeoutException : DistributedException
{
    /// <summary>Creates the exception.</summary>
    public DistributedTimeoutException() { }

    /// <summary>Creates the exception with a message.</summary>
    /// <param name="message">What timed out.</param>
    public DistributedTimeoutException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and a cause.</summary>
    /// <param name="message">What timed out.</param>
    /// <param name="inner">The cause.</param>
    public DistributedTimeoutException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>The ranks hold different parameters (names, shapes or types): they do not run the same model or adapter.</summary>
public class DistributedMismatchException : DistributedException
{
    /// <summary>Creates the exception.</summary>
    public DistributedMismatchException() { }

    /// <summary>Creates the exception with a message.</summary>
    /// <param name="message">The first difference found.</param>
    public DistributedMismatchException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and a cause.</summary>
    /// <param name="message">The first difference found.</param>
    /// <param name="inner">The cause.</param>
    public DistributedMismatchException(string message, Exception inner) : base(message, inner) { }
}
