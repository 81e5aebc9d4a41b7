//! Logging (DESIGN §10): the console, and optionally `logging.file` with size rotation
//! (`app.log`, `app.log.1` … `app.log.N`, the oldest dropped). File writes happen on a
//! background thread fed by a bounded channel, so a slow disk never holds a request;
//! if the channel is full, lines are dropped and counted. A file renamed or deleted by
//! another program (logrotate) is followed: within a second the path is opened again,
//! and at once on `Logging::reopen` (SIGHUP).

use crate::config::{log_level, Config};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the writer checks that the file's path still names the file it writes.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// The most bytes of one client value that a log line shows.
const LOGGED_VALUE_MAX: usize = 200;

/// A value a client chose (a model name, a path) as a log line shows it: control
/// characters and backslashes escaped (`\n`, `\u0000`, `\\`), cut after
/// `LOGGED_VALUE_MAX` bytes. A client can then neither forge a log line nor flood the
/// log.
pub struct Clean<'a>(pub &'a str);

impl fmt::Display for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = 0;
        for (i, c) in self.0.char_indices() {
            if shown >= LOGGED_VALUE_MAX {
                return write!(f, "…(+{} bytes)", self.0.len() - i);
            }
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c if c.is_control() => write!(f, "\\u{:04x}", u32::from(c))?,
                c => f.write_char(c)?,
            }
            shown += c.len_utf8();
        }
        Ok(())
    }
}

/// A log file that rotates when the next line would take it past `max_size`.
pub struct RotatingFile {
    path: PathBuf,
    max_size: u64,
    backups: u32,
    file: File,
    size: u64,
}

impl RotatingFile {
    pub fn open(path: &Path, max_size: u64, backups: u32) -> io::Result<RotatingFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_path_buf(),
            max_size,
            backups,
            file,
            size,
        })
    }

    /// Opens the path again, appending to what another program may have put there.
    fn reopen(&mut self) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = file;
        Ok(())
    }

    /// Whether the path no longer names the open file: renamed or deleted by another
    /// program (the same device and inode mean the same file).
    fn moved(&self) -> bool {
        match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(named), Ok(open)) => (named.dev(), named.ino()) != (open.dev(), open.ino()),
            (Err(_), _) => true,
            (Ok(_), Err(_)) => false,
        }
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        name.into()
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.backups == 0 {
            self.file = File::create(&self.path)?;
        } else {
            let _ = std::fs::remove_file(self.numbered(self.backups));
            for n in (1..self.backups).rev() {
                let _ = std::fs::rename(self.numbered(n), self.numbered(n + 1));
            }
            std::fs::rename(&self.path, self.numbered(1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }

    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }
}

/// What the logger's sink sends the writer thread.
enum Msg {
    Line(Vec<u8>),
    /// Answer once every line queued before this one is written.
    Flush(Sender<()>),
    /// Open the file's path again (SIGHUP, after an outside rotation).
    Reopen,
}

/// The `Write` end given to the logger: assembles whole lines and queues them for the
/// writer thread, so that logging a line never waits for a terminal or a disk.
pub struct LineSink {
    tx: Sender<Msg>,
    partial: Vec<u8>,
    dropped: Arc<AtomicU64>,
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Lines the writer may hold before new ones are dropped.
const QUEUE_LINES: usize = 16 * 1024;

/// The writer thread's ends: the console, and the file when there is one.
struct Writer {
    console: Box<dyn Write + Send>,
    file: Option<RotatingFile>,
    /// When the file's path was last checked (`FOLLOW_EVERY`).
    followed: Instant,
}

impl Writer {
    fn write(&mut self, line: &[u8]) {
        let _ = self.console.write_all(line);
        if let Some(file) = &mut self.file {
            if let Err(e) = file.write_line(line) {
                let _ = writeln!(self.console, "log file: {e}");
            }
        }
    }

    /// Opens the file's path again when asked (`always`), or when a check is due and
    /// finds that the path names another file or none.
    fn follow(&mut self, always: bool) {
        let Some(file) = &mut self.file else {
            return;
        };
        if !always {
            if self.followed.elapsed() < FOLLOW_EVERY {
                return;
            }
            self.followed = Instant::now();
            if !file.moved() {
                return;
            }
        }
        if let Err(e) = file.reopen() {
            let _ = writeln!(
                self.console,
                "log file: cannot open {} again: {e}",
                file.path.display()
            );
        }
    }
}

/// Starts the writer thread: each queued line goes to `console` and, when given, to
/// `file`. The thread ends when every sender is gone, after writing what was queued.
fn start_writer(
    console: Box<dyn Write + Send>,
    file: Option<RotatingFile>,
) -> io::Result<(LineSink, Sender<Msg>, JoinHandle<()>)> {
    let (tx, rx): (Sender<Msg>, Receiver<Msg>) = crossbeam_channel::bounded(QUEUE_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let seen = dropped.clone();
    let writer = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            let mut reported = 0;
            let mut out = Writer {
                console,
                file,
                followed: Instant::now(),
            };
            loop {
                // Woken at least once a period, so that an idle proxy follows its file
                // before its next line.
                let msg = match rx.recv_timeout(FOLLOW_EVERY) {
                    Ok(msg) => Some(msg),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                };
                out.follow(matches!(msg, Some(Msg::Reopen)));
                let line = match msg {
                    Some(Msg::Line(line)) => line,
                    Some(Msg::Flush(done)) => {
                        let _ = done.send(());
                        continue;
                    }
                    Some(Msg::Reopen) | None => continue,
                };
                let lost = seen.load(Ordering::Relaxed);
                if lost > reported {
                    out.write(
                        format!(
                            "[log] {} lines dropped: the writer fell behind\n",
                            lost - reported
                        )
                        .as_bytes(),
                    );
                    reported = lost;
                }
                out.write(&line);
            }
        })?;
    let sink = LineSink {
        tx: tx.clone(),
        partial: Vec::new(),
        dropped,
    };
    Ok((sink, tx, writer))
}

/// The running logger; `flush` before the process exits so queued lines are not lost.
pub struct Logging {
    tx: Sender<Msg>,
}

impl Logging {
    /// Opens `logging.file` again before the next line (SIGHUP: the convention after
    /// an outside rotation). Without a file, nothing happens.
    pub fn reopen(&self) {
        let _ = self.tx.send_timeout(Msg::Reopen, Duration::from_secs(1));
    }

    /// Waits (up to `within`) until every line logged so far is written.
    pub fn flush(&self, within: Duration) {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        if self.tx.send_timeout(Msg::Flush(done_tx), within).is_ok() {
            let _ = done_rx.recv_timeout(within);
        }
    }
}

/// Opens `logging.file` when set (creating its directory; a path that cannot be opened
/// is an error at start) and returns it ready for the writer.
pub fn open_file(config: &Config) -> Result<Option<RotatingFile>, String> {
    let Some(path) = &config.logging.file else {
        return Ok(None);
    };
    let path = Path::new(path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("logging.file: cannot create {}: {e}", dir.display()))?;
    }
    RotatingFile::open(path, config.logging.max_size, config.logging.backup_count)
        .map(Some)
        .map_err(|e| format!("logging.file: cannot open {}: {e}", path.display()))
}

/// Sets up the global logger from `logging`: the console always, `file` (from
/// `open_file`) when set, both written by one background thread.
pub fn init(config: &Config, file: Option<RotatingFile>) -> Result<Logging, String> {
    use simplelog::{ConfigBuilder, LevelFilter, WriteLogger};
    let log_config = ConfigBuilder::new()
        // Client libraries log connection details at debug level; they are not ours to show.
        .add_filter_ignore_str("ureq")
        .add_filter_ignore_str("rustls")
        .build();
    let (sink, tx, _writer) = start_writer(Box::new(std::io::stderr()), file)
        .map_err(|e| format!("cannot start the log writer: {e}"))?;
    // The logger passes every level; `log`'s maximum level filters, so that a reload
    // can change it.
    log::set_boxed_logger(WriteLogger::new(LevelFilter::Trace, log_config, sink))
        .map_err(|e| format!("cannot set up logging: {e}"))?;
    set_level(&config.logging.level);
    std::panic::set_hook(Box::new(|info| log::error!("panic: {info}")));
    Ok(Logging { tx })
}

/// Logs from now on at `level` (validated with the configuration, so `log_level` knows
/// it: `WARNING` is `warn`).
pub fn set_level(level: &str) {
    let filter = log_level(level).and_then(|l| l.parse().ok());
    log::set_max_level(filter.unwrap_or(log::LevelFilter::Info));
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::TempDir;

    fn dir(tag: &str) -> TempDir {
        TempDir::new(&format!("log-{tag}"))
    }

    fn line(i: usize) -> String {
        format!("line {i:04} {}\n", "x".repeat(89)) // 100 bytes
    }

    #[test]
    fn set_level_takes_pythons_level_names() {
        // The only test in this binary that sets the global maximum level.
        set_level("WARNING");
        assert_eq!(log::max_level(), log::LevelFilter::Warn);
        set_level("CRITICAL");
        assert_eq!(log::max_level(), log::LevelFilter::Error);
        set_level("debug");
        assert_eq!(log::max_level(), log::LevelFilter::Debug);
    }

    #[test]
    fn client_values_are_escaped_and_cut() {
        assert_eq!(
            Clean("gpt-4o\n12:00 [ERROR] x\r\t\\\u{0}\u{7f}é").to_string(),
            "gpt-4o\\n12:00 [ERROR] x\\r\\t\\\\\\u0000\\u007fé"
        );
        let long = Clean(&"ab".repeat(1000)).to_string();
        assert!(long.starts_with(&"ab".repeat(100)), "{long}");
        assert!(long.ends_with("…(+1800 bytes)"), "{long}");
    }

    #[test]
    fn rotation_keeps_backup_count_files_each_within_max_size() {
        let d = dir("rotate");
        let path = d.0.join("app.log");
        let mut f = RotatingFile::open(&path, 1000, 3).unwrap();
        for i in 0..55 {
            f.write_line(line(i).as_bytes()).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(&d.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["app.log", "app.log.1", "app.log.2", "app.log.3"]);
        let read = |n: &str| std::fs::read_to_string(d.0.join(n)).unwrap();
        for n in &names {
            assert!(read(n).len() <= 1000, "{n}: {}", read(n).len());
        }
        // 55 lines, 10 per file: app.log has 50..54, .1 has 40..49, .3 has 20..29; 0..19 dropped.
        assert_eq!(read("app.log").lines().count(), 5);
        assert!(read("app.log").starts_with("line 0050"));
        assert!(read("app.log.1").starts_with("line 0040"));
        assert!(read("app.log.3").starts_with("line 0020"));
    }

    #[test]
    fn a_file_renamed_or_deleted_elsewhere_is_seen_and_opened_again() {
        let d = dir("follow");
        let path = d.0.join("app.log");
        let mut f = RotatingFile::open(&path, 1000, 1).unwrap();
        f.write_line(b"before\n").unwrap();
        assert!(!f.moved());
        std::fs::rename(&path, d.0.join("app.log.old")).unwrap();
        assert!(f.moved(), "renamed");
        f.reopen().unwrap();
        assert!(!f.moved());
        f.write_line(b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");
        std::fs::remove_file(&path).unwrap();
        assert!(f.moved(), "deleted");
    }

    /// A console that appends to a shared buffer.
    #[derive(Clone, Default)]
    struct Console(Arc<parking_lot::Mutex<Vec<u8>>>);
    impl Write for Console {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_sink_writes_whole_lines_through_its_thread() {
        let d = dir("sink");
        let path = d.0.join("app.log");
        let console = Console::default();
        let file = RotatingFile::open(&path, 250, 1).unwrap();
        let (mut sink, tx, writer) = start_writer(Box::new(console.clone()), Some(file)).unwrap();
        for i in 0..5 {
            // The logger writes a record in pieces; lines must not be split across files.
            let l = line(i);
            let (a, b) = l.split_at(40);
            sink.write_all(a.as_bytes()).unwrap();
            sink.write_all(b.as_bytes()).unwrap();
        }
        Logging { tx: tx.clone() }.flush(std::time::Duration::from_secs(5));
        assert_eq!(
            console.0.lock().len(),
            5 * line(0).len(),
            "all on the console too"
        );
        drop((sink, tx));
        writer.join().unwrap();
        let current = std::fs::read_to_string(&path).unwrap();
        let backup = std::fs::read_to_string(d.0.join("app.log.1")).unwrap();
        assert_eq!(current, line(4));
        assert_eq!(backup, format!("{}{}", line(2), line(3)));
    }
}
