using System.Runtime.InteropServices;

namespace MinLora;

/// <summary>
/// All-or-nothing writes of a directory of files (an adapter, a checkpoint): the new version is written into a
/// staging sibling, flushed to disk, and then swapped with the old one in one step, so a reader (or a crash, a
/// <c>kill -9</c>, a full disk) only ever sees the complete previous version or the complete new one.
/// </summary>
/// <remarks>
/// On Linux the swap is <c>renameat2(RENAME_EXCHANGE)</c>: atomic, and the target directory exists at every
/// moment. Elsewhere (or on file systems without it) the old directory is renamed aside, the new one renamed into
/// place and the old one deleted; an interruption between those two renames leaves the previous version in a
/// <c>.minlora-*.old</c> sibling, which the next write through this class puts back first. Files already in the
/// target that the new version does not write are carried over (hard-linked when possible), so unrelated files a
/// user keeps there survive. Staging leftovers of interrupted writes are removed by the next write.
/// </remarks>
public static class AtomicDirectory
{
    private const string Marker = ".minlora-";

    /// <summary>
    /// Replaces (or creates) <paramref name="directory"/> with the files <paramref name="write"/> puts into the
    /// staging directory it is given.
    /// </summary>
    /// <param name="directory">The target directory.</param>
    /// <param name="write">Writes the new version's files into the given (empty, existing) staging directory.</param>
    /// <param name="carryOver">
    /// Which entries of the previous version (paths relative to the directory) the new version keeps when it does not
    /// write them itself; null keeps all. A checkpoint writer excludes its own kinds of files, so a stale index or
    /// shard of an earlier save can never sit beside the new weights.
    /// </param>
    /// <exception cref="IOException">The target cannot be written (nothing of it changed).</exception>
    /// <exception cref="UnauthorizedAccessException">No permission to write beside or into the target (nothing changed).</exception>
    public static void Write(string directory, Action<string> write, Func<string, bool>? carryOver = null)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        ArgumentNullException.ThrowIfNull(write);
        var target = Path.TrimEndingDirectorySeparator(Path.GetFullPath(directory));
        var parent = Path.GetDirectoryName(target) ?? throw new IOException($"Cannot write the root directory '{target}' atomically.");
        if (File.Exists(target)) throw new IOException($"'{target}' is a file, not a directory.");
        Directory.CreateDirectory(parent);
        Recover(target);

        var tag = $"{Marker}{Environment.ProcessId}-{Guid.NewGuid():N}";
        var staging = target + tag + ".staging";
        Directory.CreateDirectory(staging);
        try
        {
            write(staging);
            FlushTree(staging);                                  // the new files only: carried ones are already on disk
            if (Directory.Exists(target)) CarryOver(target, staging, "", carryOver ?? (_ => true));
            FlushDirectory(staging);
            if (!Directory.Exists(target))
            {
                Directory.Move(staging, target);
                FlushDirectory(parent);
                return;
            }
            if (TryExchange(staging, target))
            {
                FlushDirectory(parent);
                Directory.Delete(staging, recursive: true); // now the previous version
                return;
            }
            var old = target + tag + ".old";
            Directory.Move(target, old);
            Directory.Move(staging, target);
            FlushDirectory(parent);
            Directory.Delete(old, recursive: true);
        }
        catch
        {
            TryDelete(staging);
            throw;
        }
    }

    /// <summary>
    /// Puts back a previous version left aside by an interrupted two-rename swap, and removes staging directories of
    /// writers that no longer run. Called by <see cref="Write"/>; loaders may call it before reading.
    /// </summary>
    /// <param name="directory">The target directory.</param>
    public static void Recover(string directory)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(directory);
        var target = Path.TrimEndingDirectorySeparator(Path.GetFullPath(directory));
        var parent = Path.GetDirectoryName(target);
        if (parent is null || !Directory.Exists(parent)) return;
        var name = Path.GetFileName(target);
        foreach (var sibling in Directory.EnumerateDirectories(parent, name + Marker + "*"))
        {
            var rest = Path.GetFileName(sibling)[(name.Length + Marker.Length)..];
            int dash = rest.IndexOf('-', StringComparison.Ordinal);
            if (dash <= 0 || !int.TryParse(rest[..dash], out int pid) || IsRunning(pid) && pid != Environment.ProcessId) continue;
            if (pid == Environment.ProcessId && rest.EndsWith(".staging", StringComparison.Ordinal)) continue; // another thread's write in progress
            if (rest.EndsWith(".old", StringComparison.Ordinal) && !Directory.Exists(target))
            {
                Directory.Move(sibling, target);
                continue;
            }
            TryDelete(sibling);
        }
    }

    /// <summary>Writes one file all-or-nothing: a temporary sibling, flushed, then renamed over the target.</summary>
    /// <param name="path">The target file.</param>
    /// <param name="write">Writes the content to the given temporary path.</param>
    public static void WriteFile(string path, Action<string> write)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        ArgumentNullException.ThrowIfNull(write);
        var full = Path.GetFullPath(path);
        if (Directory.Exists(full)) throw new IOException($"'{full}' is a directory, not a file.");
        RemoveDeadTemporaries(full);
        var tmp = full + $"{Marker}{Environment.ProcessId}-{Guid.NewGuid():N}.tmp";
        try
        {
            write(tmp);
            FlushFile(tmp);
            File.Move(tmp, full, overwrite: true);
            if (Path.GetDirectoryName(full) is { } dir) FlushDirectory(dir);
        }
        finally
        {
            if (File.Exists(tmp)) File.Delete(tmp);
        }
    }

    /// <summary>Removes <c>file.minlora-PID-*.tmp</c> siblings of writers that no longer run.</summary>
    private static void RemoveDeadTemporaries(string full)
    {
        var dir = Path.GetDirectoryName(full);
        if (dir is null || !Directory.Exists(dir)) return;
        var name = Path.GetFileName(full);
        foreach (var tmp in Directory.EnumerateFiles(dir, name + Marker + "*.tmp"))
        {
            var rest = Path.GetFileName(tmp)[(name.Length + Marker.Length)..];
            int dash = rest.IndexOf('-', StringComparison.Ordinal);
            if (dash <= 0 || !int.TryParse(rest[..dash], out int pid) || IsRunning(pid)) continue;
            try { File.Delete(tmp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    private static bool IsRunning(int pid)
    {
        try
        {
            using var p = System.Diagnostics.Process.GetProcessById(pid);
            return !p.HasExited;
        }
        catch (ArgumentException)
        {
            return false;
        }
        catch (InvalidOperationException)
        {
            return false;
        }
    }

    /// <summary>
    /// Entries of the old version the new one does not have: hard links (same file system), else copies; symbolic links
    /// are recreated as links (never followed).
    /// </summary>
    private static void CarryOver(string from, string to, string relative, Func<string, bool> keep)
    {
        foreach (var entry in new DirectoryInfo(from).EnumerateFileSystemInfos())
        {
            var rel = relative.Length == 0 ? entry.Name : Path.Combine(relative, entry.Name);
            var dest = Path.Combine(to, entry.Name);
            if (File.Exists(dest) || Directory.Exists(dest) || !keep(rel)) continue;
            if (entry.LinkTarget is { } link)
            {
                if (entry is DirectoryInfo) Directory.CreateSymbolicLink(dest, link);
                else File.CreateSymbolicLink(dest, link);
            }
            else if (entry is DirectoryInfo dir)
            {
                Directory.CreateDirectory(dest);
                CarryOver(dir.FullName, dest, rel, keep);
            }
            else if (OperatingSystem.IsWindows() || Native.link(entry.FullName, dest) != 0)
            {
                File.Copy(entry.FullName, dest);
            }
        }
    }

    private static bool TryExchange(string a, string b)
    {
        if (!OperatingSystem.IsLinux()) return false;
        try
        {
            const int AtFdCwd = -100;
            const uint RenameExchange = 2;
            return Native.renameat2(AtFdCwd, a, AtFdCwd, b, RenameExchange) == 0;
        }
        catch (EntryPointNotFoundException)
        {
            return false;
        }
        catch (DllNotFoundException)
        {
            return false;
        }
    }

    private static void FlushTree(string directory)
    {
        foreach (var entry in new DirectoryInfo(directory).EnumerateFileSystemInfos("*", SearchOption.AllDirectories))
        {
            if (entry.LinkTarget is not null) continue;
            if (entry is DirectoryInfo) FlushDirectory(entry.FullName);
            else FlushFile(entry.FullName);
        }
        FlushDirectory(directory);
    }

    private static void FlushFile(string path)
    {
        using var fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        fs.Flush(flushToDisk: true);
    }

    /// <summary>fsync of a directory (its entries), where the platform allows it.</summary>
    private static void FlushDirectory(string path)
    {
        if (OperatingSystem.IsWindows()) return;
        try
        {
            const int ReadOnly = 0;
            int fd = Native.open(path, ReadOnly);
            if (fd < 0) return;
            Native.fsync(fd);
            Native.close(fd);
        }
        catch (EntryPointNotFoundException)
        {
        }
        catch (DllNotFoundException)
        {
        }
    }

    private static void TryDelete(string directory)
    {
        try
        {
            if (Directory.Exists(directory)) Directory.Delete(directory, recursive: true);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }

    private static class Native
    {
        [DllImport("libc", SetLastError = true)]
        internal static extern int renameat2(int olddirfd, [MarshalAs(UnmanagedType.LPUTF8Str)] string oldpath, int newdirfd, [MarshalAs(UnmanagedType.LPUTF8Str)] string newpath, uint flags);

        [DllImport("libc", SetLastError = true)]
        internal static extern int link([MarshalAs(UnmanagedType.LPUTF8Str)] string oldpath, [MarshalAs(UnmanagedType.LPUTF8Str)] string newpath);

        [DllImport("libc", SetLastError = true)]
        internal static extern int open([MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags);

        [DllImport("libc", SetLastError = true)]
        internal static extern int fsync(int fd);

        [DllImport("libc", SetLastError = true)]
        internal static extern int close(int fd);
    }
}
