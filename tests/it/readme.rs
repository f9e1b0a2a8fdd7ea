//! The README's shell blocks, run as written.
//!
//! Every fenced block tagged `sh`, `bash` or `shell` in README.md runs in
//! `bash` with `set -e`, from the repository root, in the order of the
//! README. A block fails when a command exits non-zero, or when an output
//! line it shows is missing. An HTML comment right before a block (blank
//! lines between are fine) changes how it runs:
//!
//! - `<!-- readme-test: skip (reason) -->`: not run; listed with its reason
//!   in the test's output, so skipping is a visible choice.
//! - `<!-- readme-test: background (port 8080) -->`: a server; started in
//!   the background and, with `port N`, waited on (bounded) until N accepts
//!   connections before the next block runs.
//!
//! Everything a block starts (its `&` jobs too) runs in the block's own
//! process group, which is stopped (SIGTERM, then SIGKILL) at the end of
//! the README section (the next `#` heading): a section is one walkthrough.
//!
//! Shown output: a line `# => TEXT` in a block says that TEXT appears in
//! the block's standard output, after the text of the previous `# =>` line.
//! For a background block it is awaited (bounded) at the end of its
//! section, after the blocks that follow it have run.
//!
//! The environment the blocks see:
//! - `cargo run [--release] [--features F] [--bin NAME] [-- ARGS]` runs the binary this
//!   test suite already built (`CARGO_BIN_EXE_hookbridge`,
//!   `CARGO_BIN_EXE_kinovi-sim`); `cargo build ...` does nothing; any other
//!   cargo command fails (mark such a block skip). `hookbridge` and
//!   `kinovi-sim` are on PATH.
//! - `curl` is called with `--fail-with-body --max-time 30`, so an HTTP
//!   error answer fails the block.
//! - The README's fixed ports are replaced by free ones ([`PORTS`]): `:8080`,
//!   `:9091` and `:9400` in a block's text become `:<free port>`, and the bridge
//!   listens on the free ports through `HOOKBRIDGE_SERVER__LISTEN` and
//!   `HOOKBRIDGE_ADMIN__LISTEN`. So the
//!   test can run next to anything on this machine.
//! - `HOOKBRIDGE_OUTBOX__DATA_DIR` is a temporary folder per section.
//! - `HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP` / `HOOKBRIDGE_TEST_NATS_URL` are
//!   passed on, for blocks that need a broker; other `HOOKBRIDGE_*`
//!   variables and `RUST_LOG` are not.
//!
//! A failure names the block by its README line and first command line.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The README's fixed ports, each with the variable that moves hookbridge's
/// listener there (if it is a hookbridge listener).
const PORTS: &[(u16, Option<&str>)] = &[
    (8080, Some("HOOKBRIDGE_SERVER__LISTEN")),
    (9091, Some("HOOKBRIDGE_ADMIN__LISTEN")),
    (9400, None), // kinovi-sim
];
/// Longest run of a foreground block.
const FOREGROUND_LIMIT: Duration = Duration::from_secs(120);
/// Longest wait for a background block's port, or for its shown output.
const BACKGROUND_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for a section's processes to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Run,
    Skip(String),
    Background { port: Option<u16> },
}

#[derive(Debug)]
struct Block {
    /// README line of the opening fence (1-based).
    line: usize,
    section: usize,
    code: String,
    mode: Mode,
}

impl Block {
    fn name(&self) -> String {
        let first = self
            .code
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        format!("README.md:{} `{}`", self.line, first.trim())
    }

    /// The texts of its `# => TEXT` lines, in order.
    fn shown_output(&self) -> Vec<String> {
        self.code
            .lines()
            .filter_map(|l| l.trim().strip_prefix("# =>"))
            .map(|t| t.trim().to_string())
            .collect()
    }
}

/// The README's shell blocks, their markers and sections.
fn parse(readme: &str) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut section = 0;
    let mut marker: Option<(usize, Mode)> = None;
    let mut lines = readme.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let n = i + 1;
        if let Some(fence) = line.strip_prefix("```") {
            let mut code = String::new();
            for (_, l) in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                code.push_str(l);
                code.push('\n');
            }
            let shell = matches!(fence.trim(), "sh" | "bash" | "shell");
            match (shell, marker.take()) {
                (true, m) => blocks.push(Block {
                    line: n,
                    section,
                    code,
                    mode: m.map_or(Mode::Run, |(_, m)| m),
                }),
                (false, Some((at, _))) => {
                    return Err(format!(
                        "README.md:{at}: readme-test marker before a block that is not `sh`"
                    ))
                }
                (false, None) => {}
            }
        } else if let Some(rest) = line.trim().strip_prefix("<!-- readme-test:") {
            let spec = rest
                .strip_suffix("-->")
                .ok_or_else(|| format!("README.md:{n}: marker must end with `-->` on its line"))?;
            marker = Some((
                n,
                parse_marker(spec.trim()).map_err(|e| format!("README.md:{n}: {e}"))?,
            ));
        } else if line.starts_with('#') {
            section += 1;
            if let Some((at, _)) = marker.take() {
                return Err(format!(
                    "README.md:{at}: readme-test marker not followed by a block"
                ));
            }
        } else if !line.trim().is_empty() {
            if let Some((at, _)) = marker.take() {
                return Err(format!(
                    "README.md:{at}: readme-test marker not right before a block"
                ));
            }
        }
    }
    Ok(blocks)
}

/// `skip (reason)` or `background` / `background (port N)`.
fn parse_marker(spec: &str) -> Result<Mode, String> {
    let paren = |rest: &str| {
        let rest = rest.trim();
        rest.strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .map(|r| r.trim().to_string())
    };
    if let Some(rest) = spec.strip_prefix("skip") {
        match paren(rest) {
            Some(reason) if !reason.is_empty() => Ok(Mode::Skip(reason)),
            _ => Err("`skip` needs a reason: `skip (why)`".into()),
        }
    } else if let Some(rest) = spec.strip_prefix("background") {
        if rest.trim().is_empty() {
            return Ok(Mode::Background { port: None });
        }
        paren(rest)
            .and_then(|r| r.strip_prefix("port").map(|p| p.trim().parse::<u16>()))
            .and_then(Result::ok)
            .map(|port| Mode::Background { port: Some(port) })
            .ok_or_else(|| "write `background` or `background (port N)`".into())
    } else {
        Err(format!(
            "unknown marker `{spec}`: use `skip (reason)` or `background (port N)`"
        ))
    }
}

/// `text` with every README port (`:8080` not followed by a digit) moved.
fn move_ports(text: &str, ports: &[(u16, u16)]) -> String {
    let mut text = text.to_string();
    for (from, to) in ports {
        let needle = format!(":{from}");
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(i) = rest.find(&needle) {
            let after = &rest[i + needle.len()..];
            out.push_str(&rest[..i]);
            if after.starts_with(|c: char| c.is_ascii_digit()) {
                out.push_str(&needle);
            } else {
                let _ = write!(out, ":{to}");
            }
            rest = after;
        }
        out.push_str(rest);
        text = out;
    }
    text
}

/// Functions and settings every block starts with (bash's `BASH_ENV`).
const PRELUDE: &str = r#"
set -e
unset BASH_ENV
trap 'echo "readme-test: README.md:$((README_LINE + LINENO)): exit status $?" >&2' ERR
cargo() {
  case ${1-} in
    run) shift ;;
    build) return 0 ;;
    *) echo "readme-test: only \`cargo run\` and \`cargo build\` are mapped; mark this block skip" >&2; return 127 ;;
  esac
  local bin=hookbridge
  while (($#)); do
    case $1 in
      --release | -q | --quiet | --locked | --offline) shift ;;
      --bin) bin=$2; shift 2 ;;
      --bin=*) bin=${1#--bin=}; shift ;;
      --features) shift 2 ;;
      --features=*) shift ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  "$bin" "$@"
}
curl() { command curl --fail-with-body --max-time 30 "$@"; }
"#;

/// One started block: its process group and output files.
struct Running {
    block_name: String,
    shown: Vec<String>,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Running {
    fn output(&self) -> (String, String) {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        (read(&self.stdout), read(&self.stderr))
    }

    fn report(&self, what: &str) -> String {
        let (out, err) = self.output();
        format!(
            "{}: {what}\n--- stdout (last 3000 bytes) ---\n{}\n--- stderr (last 3000 bytes) ---\n{}",
            self.block_name,
            tail(&out),
            tail(&err)
        )
    }

    /// The first shown output line missing from stdout (in order), if any.
    fn missing_output(&self) -> Option<String> {
        let (out, _) = self.output();
        let mut rest = out.as_str();
        for text in &self.shown {
            match rest.find(text.as_str()) {
                Some(i) => rest = &rest[i + text.len()..],
                None => return Some(text.clone()),
            }
        }
        None
    }
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(3000);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Every process group a section started; stopped at the section's end or
/// when the test fails (drop).
#[derive(Default)]
struct Section {
    running: Vec<Running>,
}

impl Section {
    fn stop(&mut self) {
        for r in &self.running {
            signal_group(r.child.id(), "TERM");
        }
        let deadline = Instant::now() + STOP_LIMIT;
        for r in &mut self.running {
            while group_alive(r.child.id()) && Instant::now() < deadline {
                let _ = r.child.try_wait();
                std::thread::sleep(Duration::from_millis(50));
            }
            signal_group(r.child.id(), "KILL");
            let _ = r.child.wait();
        }
        self.running.clear();
    }
}

impl Drop for Section {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), "--".into(), format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

fn group_alive(pgid: u32) -> bool {
    Command::new("kill")
        .args(["-0", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
fn poll<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Runner {
    root: PathBuf,
    tmp: tempfile::TempDir,
    ports: Vec<(u16, u16)>,
    env: Vec<(String, String)>,
}

impl Runner {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for (name, exe) in [
            ("hookbridge", env!("CARGO_BIN_EXE_hookbridge")),
            ("kinovi-sim", env!("CARGO_BIN_EXE_kinovi-sim")),
        ] {
            std::os::unix::fs::symlink(exe, bin.join(name)).unwrap();
        }
        std::fs::write(tmp.path().join("prelude.sh"), PRELUDE).unwrap();
        let ports: Vec<(u16, u16)> = PORTS
            .iter()
            .map(|(p, _)| (*p, super::support::app::free_port()))
            .collect();
        let mut env = vec![
            (
                "PATH".to_string(),
                format!(
                    "{}:{}",
                    bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
            (
                "BASH_ENV".into(),
                tmp.path().join("prelude.sh").display().to_string(),
            ),
        ];
        for ((_, var), (_, to)) in PORTS.iter().zip(&ports) {
            if let Some(var) = var {
                env.push((var.to_string(), format!("127.0.0.1:{to}")));
            }
        }
        Self {
            root: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
            tmp,
            ports,
            env,
        }
    }

    fn start(&self, block: &Block) -> Running {
        let code = move_ports(&block.code, &self.ports);
        let dir = self.tmp.path().join(format!("block-{}", block.line));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("block.sh");
        std::fs::write(&script, &code).unwrap();
        let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
        let data_dir = self.tmp.path().join(format!("section-{}", block.section));
        let mut cmd = Command::new("bash");
        // A user's own settings would change what the README shows.
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if (key_text.starts_with("HOOKBRIDGE_") && !key_text.starts_with("HOOKBRIDGE_TEST_"))
                || key_text == "RUST_LOG"
            {
                cmd.env_remove(&key);
            }
        }
        cmd.arg(&script)
            .current_dir(&self.root)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HOOKBRIDGE_OUTBOX__DATA_DIR", data_dir.join("data"))
            // The ERR trap adds LINENO (1-based in the block) to this.
            .env("README_LINE", block.line.to_string())
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot start bash: {e}", block.name()));
        Running {
            block_name: block.name(),
            shown: move_ports(&block.shown_output().join("\n"), &self.ports)
                .lines()
                .map(str::to_string)
                .collect(),
            child,
            stdout,
            stderr,
        }
    }

    fn moved_port(&self, port: u16) -> u16 {
        self.ports
            .iter()
            .find(|(from, _)| *from == port)
            .map_or(port, |(_, to)| *to)
    }

    /// Runs the blocks of one section; `Err` names the failing block.
    fn run_section(&self, blocks: &[&Block]) -> Result<(), String> {
        let mut section = Section::default();
        let mut background = Vec::new();
        for block in blocks {
            let mut run = self.start(block);
            match &block.mode {
                Mode::Skip(_) => unreachable!("skipped blocks are filtered out"),
                Mode::Run => {
                    let status = poll(FOREGROUND_LIMIT, || run.child.try_wait().ok().flatten());
                    let Some(status) = status else {
                        let report = run.report(&format!(
                            "still running after {FOREGROUND_LIMIT:?} (a server? mark it \
                             `<!-- readme-test: background (port N) -->`)"
                        ));
                        section.running.push(run);
                        return Err(report);
                    };
                    let failure = if !status.success() {
                        Some(format!("exited with {status}"))
                    } else {
                        run.missing_output()
                            .map(|text| format!("its output lacks the shown line `# => {text}`"))
                    };
                    let report = failure.map(|f| run.report(&f));
                    section.running.push(run);
                    if let Some(report) = report {
                        return Err(report);
                    }
                }
                Mode::Background { port } => {
                    if let Some(port) = port {
                        let port = self.moved_port(*port);
                        let ready = poll(BACKGROUND_LIMIT, || {
                            if let Ok(Some(status)) = run.child.try_wait() {
                                return Some(Err(format!(
                                    "exited with {status} before port {port} accepted"
                                )));
                            }
                            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| Ok(()))
                        })
                        .unwrap_or_else(|| {
                            Err(format!(
                                "port {port} did not accept within {BACKGROUND_LIMIT:?}"
                            ))
                        });
                        if let Err(e) = ready {
                            let report = run.report(&e);
                            section.running.push(run);
                            return Err(report);
                        }
                    }
                    background.push(section.running.len());
                    section.running.push(run);
                }
            }
        }
        for i in background {
            let run = &section.running[i];
            if poll(BACKGROUND_LIMIT, || {
                run.missing_output().is_none().then_some(())
            })
            .is_none()
            {
                let text = run.missing_output().unwrap_or_default();
                return Err(run.report(&format!(
                    "its output lacks the shown line `# => {text}` (waited {BACKGROUND_LIMIT:?} \
                     after the section's last block)"
                )));
            }
        }
        section.stop();
        Ok(())
    }
}

/// Writes to the test's real stderr: libtest does not capture it, so the
/// list of skipped blocks shows in every run.
fn note(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

#[test]
fn readme_commands_work_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = parse(&readme).unwrap_or_else(|e| panic!("{e}"));
    assert!(!blocks.is_empty(), "README.md has no sh blocks");

    let mut skipped = String::new();
    for b in &blocks {
        if let Mode::Skip(reason) = &b.mode {
            let _ = writeln!(skipped, "  {}: {reason}", b.name());
        }
    }
    note(&format!("readme: blocks not run (marked skip):\n{skipped}"));

    let runner = Runner::new();
    let runnable: Vec<&Block> = blocks
        .iter()
        .filter(|b| !matches!(b.mode, Mode::Skip(_)))
        .collect();
    let mut failures = Vec::new();
    for section in runnable.chunk_by(|a, b| a.section == b.section) {
        if let Err(e) = runner.run_section(section) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} README section(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn markers_are_parsed_and_misplaced_ones_refused() {
    let readme = "# A\n<!-- readme-test: skip (needs Kafka) -->\n\n```sh\nx\n```\n\
                  ## B\n<!-- readme-test: background (port 8080) -->\n```bash\ny\n# => ok\n```\n\
                  ```\nnot shell\n```\n```sh\nz\n```\n";
    let blocks = parse(readme).unwrap();
    let modes: Vec<_> = blocks
        .iter()
        .map(|b| (b.line, b.section, b.mode.clone()))
        .collect();
    assert_eq!(
        modes,
        [
            (4, 1, Mode::Skip("needs Kafka".into())),
            (9, 2, Mode::Background { port: Some(8080) }),
            (16, 2, Mode::Run),
        ]
    );
    assert_eq!(blocks[1].shown_output(), ["ok"]);
    assert_eq!(blocks[1].name(), "README.md:9 `y`");

    for bad in [
        "<!-- readme-test: skip -->\n```sh\nx\n```\n",
        "<!-- readme-test: skip (why) -->\ntext\n```sh\nx\n```\n",
        "<!-- readme-test: skip (why) -->\n```\nx\n```\n",
        "<!-- readme-test: backgroud -->\n```sh\nx\n```\n",
        "<!-- readme-test: skip (why) -->\n# heading\n",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn readme_ports_are_moved() {
    let ports = [(8080, 41234), (9400, 41235)];
    assert_eq!(
        move_ports("curl localhost:8080/x :80801 http://127.0.0.1:9400", &ports),
        "curl localhost:41234/x :80801 http://127.0.0.1:41235"
    );
}

#[test]
fn a_broken_block_fails_naming_it() {
    let readme = "# A\n```sh\necho fine\nfalse\n```\n\
                  # B\n```sh\necho '{\"message\":\"ok\"}'\n# => {\"message\":\"refused\"}\n```\n\
                  # C\n<!-- readme-test: background (port 8080) -->\n```sh\nexit 3\n```\n\
                  # D\n```sh\ncargo run --bin kinovi-sim -- --version\ncargo test\n```\n";
    let blocks = parse(readme).unwrap();
    let runner = Runner::new();
    let errors: Vec<String> = blocks
        .iter()
        .map(|b| runner.run_section(&[b]).unwrap_err())
        .collect();
    assert!(
        errors[0].starts_with("README.md:2 `echo fine`: exited with"),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].contains("README.md:4: exit status 1"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].starts_with("README.md:7 `echo")
            && errors[1].contains("lacks the shown line `# => {\"message\":\"refused\"}`"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].contains("README.md:13 `exit 3`: exited with"),
        "{}",
        errors[2]
    );
    assert!(
        errors[3].contains("kinovi-sim") && errors[3].contains("only `cargo run`"),
        "{}",
        errors[3]
    );
}
