using System.Diagnostics;

namespace MinLora.Tests;

/// <summary>The allocator setting that bounds what glibc keeps: validated, and in effect where glibc is the C library.</summary>
public class NativeAllocatorTests
{
    [Theory]
    [InlineData(0L)]
    [InlineData(-1L)]
    [InlineData(NativeAllocator.MaxRetainedBlockBytes + 1)]
    public void RetainFreedMemory_RejectsSizesGlibcCannotTake(long bytes)
    {
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => NativeAllocator.RetainFreedMemory(bytes));
        Assert.Equal("largestRetainedBlockBytes", ex.ParamName);
    }

    /// <summary>
    /// In a fresh process, on its first thread (a test thread's own glibc arena maps every block beyond its heap, which
    /// would hide the setting): after <see cref="NativeAllocator.RetainFreedMemory()"/> turned mappings off, the
    /// overload at 32 MiB turns them on again from 32 MiB up, so a 1 GiB block is a mapping of its own and a 1 MiB
    /// block comes from the heap (MinLora.SaveLoop's <c>allocator-check</c> reads glibc's chunk headers).
    /// </summary>
    [SkippableFact]
    public async Task RetainFreedMemory_MapsBlocksFromTheLimitUp()
    {
        Skip.IfNot(OperatingSystem.IsLinux(), "glibc's allocator is a Linux matter");
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "MinLora.SaveLoop.dll"));
        psi.ArgumentList.Add("allocator-check");
        using var child = Process.Start(psi)!;
        var error = child.StandardError.ReadToEndAsync();
        var output = await child.StandardOutput.ReadToEndAsync().WaitAsync(TimeSpan.FromSeconds(60));
        await child.WaitForExitAsync();
        Assert.True(child.ExitCode == 0, $"allocator-check exited with {child.ExitCode}: {await error}");
        Skip.If(output.Contains("applied=False", StringComparison.Ordinal), "the C library is not glibc");
        Assert.Equal("applied=True large=True small=False scoped=True restored=True", output.Trim());
    }
}
