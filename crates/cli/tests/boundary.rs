//! The step boundary, attacked from inside a build: real `custody build`,
//! real bubblewrap, cgroups, loop disks and network namespaces, as root (as
//! CI and build hosts run it). Every test is a step, or a repository, doing
//! what a hostile one would, and checks what the host would notice.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use custody_testkit::netns::Internet;

mod support;
use support::{CUSTODY, build_id, custody, payload, text};

/// Writes `spec` as `dir/custody.yaml` and builds `dir` (data in `dir/data`).
fn build(dir: &Path, spec: &str, extra: &[&str]) -> Output {
    fs_err::write(dir.join("custody.yaml"), spec).unwrap();
    let data = dir.join("data");
    let mut args = vec![
        "build",
        dir.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    custody(&args)
}

/// A directory outside /tmp, /root and /home (which steps never see), so
/// what a test puts there is visible to steps unless custody hides it.
fn visible_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Starts `custody build` in the background; its stderr is read up to the
/// line that names the build, so the build is known to be running.
fn start_build(dir: &Path, spec: &str, env: &[(&str, &str)]) -> (std::process::Child, String) {
    use std::io::BufRead;
    fs_err::write(dir.join("custody.yaml"), spec).unwrap();
    let data = dir.join("data");
    let mut child = Command::new(CUSTODY)
        .args([
            "build",
            dir.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let id = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "custody build ended early"
        );
        if let Some(id) = line.strip_prefix("==> build ") {
            break id.trim().to_owned();
        }
    };
    // Keep draining stderr so the build never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (child, id)
}

/// The `custody runner` serving the build `id`, once it is up.
fn runner_pid(id: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for entry in fs_err::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = fs_err::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(" runner ") && cmdline.contains(id) {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "no runner for build {id}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `path` as the runner `pid` sees it (in its own mount namespace), once it exists.
fn in_runner(pid: u32, find: impl Fn(&Path) -> Option<PathBuf>) -> PathBuf {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = find(&root) {
            return found;
        }
        assert!(Instant::now() < deadline, "never appeared in runner {pid}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `relative` in the job directory of the runner `pid` (on the job's disk,
/// `disk/…`, or directly in the job directory as runners before the disk
/// kept it, so these attacks can be replayed against them).
fn job_file(pid: u32, relative: &str) -> PathBuf {
    in_runner(pid, |root| {
        let tmp = root.join("tmp");
        fs_err::read_dir(&tmp)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("custody-job-"))
            .flat_map(|e| {
                [
                    e.path().join("disk").join(relative),
                    e.path().join(relative),
                ]
            })
            .find(|p| p.exists())
    })
}

/// Runs `sh -c script` as the local user `nobody`.
fn as_nobody(script: &str) -> String {
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn a_step_is_root_only_inside_its_own_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = visible_dir();
    let private = secrets.path().join("root-only");
    fs_err::write(&private, "host-secret-7c1e\n").unwrap();
    fs_err::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let spec = format!(
        r#"steps:
  - name: attacker
    run: |
      head -1 /etc/shadow || echo shadow-refused
      cat {private} || echo private-refused
      echo "map: $(cat /proc/self/uid_map)"
      grep CapEff /proc/self/status
      touch /output/mine /workspace/mine
      sleep 3
"#,
        private = private.display()
    );
    let (child, id) = start_build(dir.path(), &spec, &[]);
    let pid = runner_pid(&id);
    // What the step made belongs, on the host, to an unprivileged id.
    let mine = job_file(pid, "output/mine");
    let owner = fs_err::metadata(&mine).unwrap().uid();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let out = stdout(&output);
    assert!(
        owner >= 1000,
        "the step's file is owned by host uid {owner}"
    );
    assert!(out.contains("[attacker] shadow-refused"), "{out}");
    assert!(out.contains("[attacker] private-refused"), "{out}");
    assert!(
        !out.contains("host-secret-7c1e") && !out.contains("root:"),
        "{out}"
    );
    let map = out
        .lines()
        .find_map(|l| l.strip_prefix("[attacker] map: "))
        .expect("the step printed its uid map");
    let fields: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(fields[0], "0", "{map}");
    assert_ne!(fields[1], "0", "the step's root is host root: {map}");
    assert_eq!(fields[1], owner.to_string(), "{map}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    // The provenance says how the step was isolated.
    let statement = payload(&dir.path().join(format!("data/provenance/{id}.dsse.json")));
    let sandbox = &statement["predicate"]["buildDefinition"]["internalParameters"]["sandbox"];
    assert_eq!(
        sandbox["user"]["uidMap"],
        map.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    assert_eq!(sandbox["network"], "private");
    assert!(sandbox["diskBytes"].as_u64().unwrap() > 0, "{sandbox}");
    assert_eq!(sandbox["cgroups"], true);
}

#[test]
fn a_step_image_step_installs_into_its_image_as_its_root() {
    let registry = custody_testkit::Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let (image, tagged) = support::push_busybox(&registry, dir.path());
    let project = tempfile::tempdir().unwrap();
    let spec = format!(
        "steps:\n  - name: install\n    image: {tagged}\n    run: mkdir -p /usr/local/bin && echo installed > /usr/local/bin/tool && cat /usr/local/bin/tool && echo changed >> /etc/os-release && id -u\n"
    );
    let output = build(
        project.path(),
        &spec,
        &["--insecure-registry", registry.host()],
    );
    assert!(output.status.success(), "{}", text(&output));
    let out = stdout(&output);
    assert!(out.contains("[install] installed"), "{out}");
    assert!(out.contains("[install] 0"), "{out}");
    drop(image);
}

#[test]
fn network_steps_reach_only_public_or_allowed_destinations_never_the_host() {
    let mut internet = Internet::start(&[("file", "from the internet\n")]);
    let loopback_port = custody_testkit::free_port();
    internet.serve_on_host("127.0.0.1", loopback_port);
    // A host address: the host's end of the pair, serving too.
    let host_port = custody_testkit::free_port();
    internet.serve_on_host(&internet.host_addr.to_string(), host_port);
    internet.serve_metadata();
    let server = format!("{}:{}", internet.server_addr, internet.port);
    let targets = [
        ("internet", format!("http://{server}/file")),
        ("loopback", format!("http://127.0.0.1:{loopback_port}/file")),
        // A name that resolves to loopback: checked after DNS.
        ("named", format!("http://localhost:{loopback_port}/file")),
        (
            "host",
            format!("http://{}:{host_port}/file", internet.host_addr),
        ),
        ("metadata", "http://169.254.169.254/file".to_owned()),
    ];
    let mut run = String::from("set +e\n");
    for (name, url) in &targets {
        // Through the proxy (plain and as a CONNECT tunnel), and directly.
        run.push_str(&format!(
            "echo \"{name} proxy $(curl -s -m 5 --noproxy '' {url})\"\n\
             echo \"{name} tunnel $(curl -s -m 5 -p --noproxy '' {url})\"\n\
             echo \"{name} direct $(curl -s -m 5 --noproxy '*' {url} || echo failed)\"\n"
        ));
    }
    let spec = format!(
        "steps:\n  - name: out\n    network: true\n    run: |\n{}",
        run.lines()
            .map(|l| format!("      {l}\n"))
            .collect::<String>()
    );
    let seen = |output: &Output, name: &str, how: &str| -> bool {
        stdout(output)
            .lines()
            .any(|l| l.starts_with(&format!("[out] {name} {how} from the internet")))
    };

    let dir = tempfile::tempdir().unwrap();
    let refused = build(dir.path(), &spec, &[]);
    assert!(refused.status.success(), "{}", text(&refused));
    for (name, _) in &targets {
        for how in ["proxy", "tunnel", "direct"] {
            assert!(
                !seen(&refused, name, how),
                "{name} {how}:\n{}",
                text(&refused)
            );
        }
    }
    // The refusal says why, in the step's log.
    let log = text(&refused);
    for why in [
        "is a private address",
        "is a loopback address",
        "is a link-local address",
    ] {
        assert!(log.contains(why), "`{why}` not said:\n{log}");
    }

    // The operator allows the one server; the host stays out of reach.
    let dir = tempfile::tempdir().unwrap();
    let allowed = build(
        dir.path(),
        &spec,
        &["--egress-allow", &internet.server_addr.to_string()],
    );
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(seen(&allowed, "internet", "proxy"), "{}", text(&allowed));
    assert!(seen(&allowed, "internet", "tunnel"), "{}", text(&allowed));
    assert!(!seen(&allowed, "internet", "direct"), "{}", text(&allowed));
    for name in ["loopback", "named", "host", "metadata"] {
        for how in ["proxy", "tunnel", "direct"] {
            assert!(
                !seen(&allowed, name, how),
                "{name} {how}:\n{}",
                text(&allowed)
            );
        }
    }
    assert!(
        text(&allowed).contains("is an address of the build host"),
        "{}",
        text(&allowed)
    );
    let statement = payload(
        &dir.path()
            .join(format!("data/provenance/{}.dsse.json", build_id(&allowed))),
    );
    let sandbox = &statement["predicate"]["buildDefinition"]["internalParameters"]["sandbox"];
    assert_eq!(sandbox["egressAllow"][0], internet.server_addr.to_string());
}

/// User namespaces put a large part of the kernel (mounts, capabilities
/// inside the namespace) in reach of whoever makes one. A step cannot,
/// unless its spec says `user_namespaces: true`; the provenance records
/// which steps could.
#[test]
fn a_step_makes_no_user_namespace_unless_its_spec_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let attempt = "unshare --user true 2>&1; echo \"userns exit $?\"; \
                   echo 1 > /proc/sys/user/max_user_namespaces 2>&1 || echo raise-refused";
    let spec = format!(
        "steps:\n  - name: attacker\n    run: {attempt}\n  - name: builder\n    user_namespaces: true\n    run: unshare --user true; echo \"userns exit $?\"\n"
    );
    let output = build(dir.path(), &spec, &[]);
    assert!(output.status.success(), "{}", text(&output));
    let out = stdout(&output);
    assert!(out.contains("[attacker] userns exit 1"), "{out}");
    assert!(out.contains("No space left on device"), "{out}");
    assert!(out.contains("[attacker] raise-refused"), "{out}");
    assert!(out.contains("[builder] userns exit 0"), "{out}");
    let statement = payload(
        &dir.path()
            .join(format!("data/provenance/{}.dsse.json", build_id(&output))),
    );
    let steps =
        &statement["predicate"]["buildDefinition"]["internalParameters"]["sandbox"]["steps"];
    assert_eq!(steps[0]["userNamespaces"], false, "{steps}");
    assert_eq!(steps[1]["userNamespaces"], true, "{steps}");
}

/// Whoever starts custody may leave descriptors open (a shell's, a
/// service manager's): here a file the operator opened, inherited as fd 9.
/// A step that reads fd 9, or lists its descriptors, finds nothing of it.
#[test]
fn a_descriptor_custody_inherited_never_reaches_a_step() {
    use command_fds::{CommandFdExt, FdMapping};
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("operator-secret");
    fs_err::write(&secret, "the operator's secret\n").unwrap();
    let spec = "steps:\n  - name: fds\n    run: |\n\
                \x20     echo \"fd 9: $(cat <&9 2>&1 || true)\"\n\
                \x20     ls -l /proc/self/fd/\n";
    fs_err::write(dir.path().join("custody.yaml"), spec).unwrap();
    let data = dir.path().join("data");
    let mut command = std::process::Command::new(support::CUSTODY);
    command
        .args(["build", dir.path().to_str().unwrap(), "--data-dir"])
        .arg(&data)
        .fd_mappings(vec![FdMapping {
            parent_fd: fs_err::File::open(&secret).unwrap().into_parts().0.into(),
            child_fd: 9,
        }])
        .unwrap();
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let out = stdout(&output);
    assert!(out.contains("[fds] fd 9: "), "{out}");
    assert!(!out.contains("the operator's secret"), "{out}");
    assert!(!out.contains("operator-secret"), "{out}");
    assert!(!out.contains(" 9 -> "), "{out}");
}

/// The `egress:STEP` byproducts of the build `output` made in `dir`.
fn egress_byproducts(dir: &Path, output: &Output) -> Vec<serde_json::Value> {
    let statement = payload(&dir.join(format!("data/provenance/{}.dsse.json", build_id(output))));
    statement["predicate"]["runDetails"]["byproducts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["name"].as_str().is_some_and(|n| n.starts_with("egress:")))
        .cloned()
        .collect()
}

/// `custody verify` of the artifact a build in `dir` pushed to
/// `oci:out/files:v1`, with the build's key and the extra arguments given.
fn verifier(dir: &Path) -> impl Fn(&[&str]) -> Output {
    let artifact = format!("oci:{}:v1", dir.join("out/files").display());
    let key = dir.join("data/keys/custody.pub");
    move |extra: &[&str]| {
        let mut args = vec!["verify", artifact.as_str(), "--key", key.to_str().unwrap()];
        args.extend_from_slice(extra);
        custody(&args)
    }
}

/// The sha256 of `path`, by `sha256sum`, not by custody's code.
fn sha256sum(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(output.stdout).unwrap()[..64].to_owned()
}

#[test]
fn what_steps_fetch_is_in_the_provenance_and_verify_holds_builds_to_it() {
    let mut internet = Internet::start(&[("file", "a file from the internet\n")]);
    let server = internet.server_addr.to_string();
    let certs = custody_testkit::certs::Certs::for_hosts(&[&server]);
    internet.serve_tls(8443, &certs.server);
    let dir = tempfile::tempdir().unwrap();
    // The test CA goes in with the source; curl trusts nothing else.
    fs_err::write(dir.path().join("ca.pem"), &certs.ca.cert_pem).unwrap();
    let spec = format!(
        "steps:\n  - name: fetch\n    network: true\n    run: |\n\
         \x20     curl -sS -f -m 10 --cacert ca.pem https://{server}:8443/file -o tls.txt\n\
         \x20     curl -sS -f -m 10 http://{server}:8000/file -o plain.txt\n\
         \x20     cmp tls.txt plain.txt\n\
         artifacts:\n  - paths: [tls.txt, plain.txt]\n    to: oci:out/files:v1\n"
    );
    let output = build(dir.path(), &spec, &["--egress-allow", &server]);
    assert!(output.status.success(), "{}", text(&output));

    let byproducts = egress_byproducts(dir.path(), &output);
    assert_eq!(byproducts.len(), 2, "{byproducts:#?}");
    let tunnel = byproducts
        .iter()
        .find(|b| b["uri"] == format!("tcp://{server}:8443"))
        .unwrap_or_else(|| panic!("no tunnel recorded: {byproducts:#?}"));
    assert_eq!(tunnel["name"], "egress:fetch");
    assert_eq!(tunnel["annotations"]["step"], "fetch");
    assert!(
        tunnel
            .get("digest")
            .is_none_or(|d| d.as_object().unwrap().is_empty())
    );
    // A TLS handshake and a response went each way.
    assert!(
        tunnel["annotations"]["bytesSent"].as_u64().unwrap() > 100,
        "{tunnel}"
    );
    assert!(
        tunnel["annotations"]["bytesReceived"].as_u64().unwrap() > 100,
        "{tunnel}"
    );
    let plain = byproducts
        .iter()
        .find(|b| b["uri"] == format!("http://{server}:8000/file"))
        .unwrap_or_else(|| panic!("no HTTP request recorded: {byproducts:#?}"));
    assert_eq!(plain["annotations"]["step"], "fetch");
    assert_eq!(plain["digest"]["sha256"], sha256sum(&internet.path("file")));
    let served = fs_err::metadata(internet.path("file")).unwrap().len();
    assert!(plain["annotations"]["bytesReceived"].as_u64().unwrap() > served);
    assert!(plain["annotations"]["bytesSent"].as_u64().unwrap() > 0);

    let verify = verifier(dir.path());
    let plain_verify = verify(&[]);
    assert!(plain_verify.status.success(), "{}", text(&plain_verify));
    // Verified, and the summary says where the steps went.
    assert!(
        stdout(&plain_verify).contains(&format!(
            "  egress       2:\n    http://{server}:8000/file (step fetch)\n    tcp://{server}:8443 (step fetch)"
        )),
        "{}",
        text(&plain_verify)
    );
    let hermetic = verify(&["--no-egress"]);
    assert_eq!(hermetic.status.code(), Some(1), "{}", text(&hermetic));
    for destination in [
        format!("tcp://{server}:8443 (step fetch)"),
        format!("http://{server}:8000/file (step fetch)"),
    ] {
        assert!(
            text(&hermetic).contains(&destination),
            "{}",
            text(&hermetic)
        );
    }
    let allowed = verify(&["--allow-egress", &server]);
    assert!(allowed.status.success(), "{}", text(&allowed));
    let elsewhere = verify(&[
        "--allow-egress",
        "pypi.org",
        "--allow-egress",
        "*.pythonhosted.org",
    ]);
    assert_eq!(elsewhere.status.code(), Some(1), "{}", text(&elsewhere));
    assert!(
        text(&elsewhere).contains(&format!(
            "step `fetch` reached `tcp://{server}:8443`, which no `--allow-egress` pattern allows"
        )),
        "{}",
        text(&elsewhere)
    );
    // A port narrows it: the plain HTTP request is outside `HOST:8443`.
    let one_port = verify(&["--allow-egress", &format!("{server}:8443")]);
    assert_eq!(one_port.status.code(), Some(1), "{}", text(&one_port));
    assert!(
        text(&one_port).contains(&format!("`http://{server}:8000/file`")),
        "{}",
        text(&one_port)
    );
}

/// A step that makes more distinct requests than a provenance keeps
/// (1,100 URLs, one query each) cannot grow the provenance with them:
/// the first 1,000 are recorded exactly, the rest folded into one
/// `tcp://HOST:PORT` record that counts them, and `verify` still holds the
/// build to its destinations.
#[test]
fn a_step_making_a_flood_of_requests_gets_them_folded_not_recorded_one_by_one() {
    let internet = Internet::start(&[("file", "from the internet\n")]);
    let server = format!("{}:{}", internet.server_addr, internet.port);
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "steps:\n  - name: flood\n    network: true\n    run: |\n\
         \x20     curl -sS -f --noproxy '' -o /dev/null 'http://{server}/file?n=[1-1100]'\n\
         \x20     echo flooded\n\
         artifacts:\n  - paths: [custody.yaml]\n    to: oci:out/files:v1\n"
    );
    let output = build(
        dir.path(),
        &spec,
        &["--egress-allow", &internet.server_addr.to_string()],
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        stdout(&output).contains("[flood] flooded"),
        "{}",
        text(&output)
    );
    let byproducts = egress_byproducts(dir.path(), &output);
    assert_eq!(
        byproducts.len(),
        1001,
        "one record per URL, then one folded"
    );
    let folded: Vec<_> = byproducts
        .iter()
        .filter(|b| b["annotations"].get("folded").is_some())
        .collect();
    assert_eq!(folded.len(), 1, "{folded:#?}");
    assert_eq!(folded[0]["uri"], format!("tcp://{server}"));
    assert_eq!(folded[0]["annotations"]["folded"], 100);
    assert!(
        folded[0]
            .get("digest")
            .is_none_or(|d| d.as_object().unwrap().is_empty())
    );

    let verify = verifier(dir.path());
    let hermetic = verify(&["--no-egress"]);
    assert_eq!(hermetic.status.code(), Some(1), "{}", text(&hermetic));
    let allowed = verify(&["--allow-egress", &internet.server_addr.to_string()]);
    assert!(allowed.status.success(), "{}", text(&allowed));
    let elsewhere = verify(&["--allow-egress", "pypi.org"]);
    assert_eq!(elsewhere.status.code(), Some(1), "{}", text(&elsewhere));
}

#[test]
fn a_step_with_a_host_list_reaches_only_what_it_lists() {
    let mut internet = Internet::start(&[("file", "from the internet\n")]);
    let server = internet.server_addr.to_string();
    let certs = custody_testkit::certs::Certs::for_hosts(&[&server]);
    internet.serve_tls(8443, &certs.server);
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(dir.path().join("ca.pem"), &certs.ca.cert_pem).unwrap();
    // The operator allows the whole server; the step lists one port of it.
    let spec = format!(
        "steps:\n  - name: listed\n    network: [\"{server}:8000\", \"*.example.org\"]\n    run: |\n\
         \x20     echo \"listed $(curl -s -m 5 http://{server}:8000/file)\"\n\
         \x20     echo \"unlisted $(curl -s -m 5 --cacert ca.pem https://{server}:8443/file)\"\n\
         \x20     echo \"unlisted-http $(curl -s -m 5 http://{server}:8443/file)\"\n"
    );
    let output = build(dir.path(), &spec, &["--egress-allow", &server]);
    assert!(output.status.success(), "{}", text(&output));
    let out = stdout(&output);
    assert!(
        out.contains("[listed] listed from the internet"),
        "{}",
        text(&output)
    );
    assert!(
        !out.contains("unlisted from the internet"),
        "{}",
        text(&output)
    );
    assert!(
        !out.contains("unlisted-http from the internet"),
        "{}",
        text(&output)
    );
    let refusal = format!(
        "egress to `{server}:8443` refused: it is not in the step's `network` list (`{server}:8000`, `*.example.org`)"
    );
    assert!(text(&output).contains(&refusal), "{}", text(&output));
    // Only what was reached is recorded.
    let uris: Vec<String> = egress_byproducts(dir.path(), &output)
        .iter()
        .map(|b| b["uri"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(uris, [format!("http://{server}:8000/file")]);
}

/// Free bytes on the filesystem of `path`.
fn free_bytes(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).unwrap();
    stat.blocks_available() * stat.fragment_size()
}

#[test]
fn a_step_that_fills_its_disk_fails_and_the_host_gets_the_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let before = free_bytes(Path::new("/tmp"));
    let spec = "disk: 256MiB\nsteps:\n  - name: fill\n    run: dd if=/dev/zero of=/workspace/big bs=1M count=1024\n";
    let output = build(dir.path(), spec, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let log = text(&output);
    assert!(
        log.contains("step `fill` exceeded its disk limit of 256 MiB"),
        "{log}"
    );
    assert!(log.contains("No space left on device"), "{log}");
    // The space is back (within what other tests may be doing meanwhile).
    let after = free_bytes(Path::new("/tmp"));
    assert!(
        after + (128 << 20) > before,
        "/tmp has {} MiB less free than before the build",
        (before - after) >> 20
    );
    // And the next build runs.
    let next = build(
        dir.path(),
        "steps:\n  - name: ok\n    run: df -h /workspace\n",
        &[],
    );
    assert!(next.status.success(), "{}", text(&next));
}

#[test]
fn a_flood_of_output_is_cut_to_the_log_limit_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    // 2 GiB of 1000-byte lines, then 100 MiB without a newline, then a last line.
    let spec = r#"steps:
  - name: flood
    run: |
      yes "$(head -c 999 /dev/zero | tr '\0' x)" | head -c 2147483648
      echo
      head -c 104857600 /dev/zero | tr '\0' y
      echo
      echo the-end
"#;
    fs_err::write(dir.path().join("custody.yaml"), spec).unwrap();
    let data = dir.path().join("data");
    // GNU time: the largest resident set of custody and everything it
    // started (the embedded daemon, the runner), in KiB.
    let output = Command::new("/usr/bin/time")
        .args(["-f", "maxrss_kib=%M", CUSTODY, "build"])
        .arg(dir.path())
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        text(&output).chars().take(3000).collect::<String>()
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let rss_kib: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("maxrss_kib="))
        .and_then(|n| n.trim().parse().ok())
        .expect("GNU time reports");
    assert!(rss_kib < 200 * 1024, "peak RSS {} MiB", rss_kib >> 10);

    let id = build_id(&output);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lines = runtime.block_on(async {
        let store = custody_daemon::store::Store::open_sqlite(&data.join("custody.db"))
            .await
            .unwrap();
        let lines = store.logs(&id).await.unwrap();
        store.close().await;
        lines
    });
    let limit = custody_daemon::bounds::DEFAULT_LOG_BYTES;
    let stored: u64 = lines.iter().map(|l| l.line.len() as u64 + 64).sum();
    assert!(stored <= limit + limit / 8, "{stored} bytes stored");
    assert!(stored > limit / 2, "the tail was kept too: {stored}");
    assert!(lines[0].line.starts_with(b"xxxx"));
    assert_eq!(lines.last().unwrap().line, b"the-end");
    let marker = lines
        .iter()
        .position(|l| {
            l.line.starts_with(b"[custody] ") && l.line.windows(8).any(|w| w == b"were cut")
        })
        .expect("the cut is marked");
    assert!(marker > 0 && marker < lines.len() - 1);
    let long = lines
        .iter()
        .find(|l| l.line.starts_with(b"yyyy"))
        .expect("the long line is kept, cut");
    assert!(long.line.len() < 100 << 10, "{}", long.line.len());
    assert!(String::from_utf8_lossy(&long.line).ends_with("more bytes of this line were cut]"));

    // The provenance's log digest is of what was kept, and says lines were cut.
    let statement = payload(&data.join(format!("provenance/{id}.dsse.json")));
    let byproduct = &statement["predicate"]["runDetails"]["byproducts"][0];
    assert_eq!(byproduct["name"], "log:flood");
    assert!(byproduct["annotations"]["cutLines"].as_u64().unwrap() > 1_000_000);
    let mut kept = Vec::new();
    for line in &lines {
        kept.extend_from_slice(&line.line);
        kept.push(b'\n');
    }
    assert_eq!(
        format!("sha256:{}", byproduct["digest"]["sha256"].as_str().unwrap()),
        custody_testkit::image::sha256(&kept)
    );
}

#[test]
fn nothing_of_a_build_is_left_running_or_behind() {
    // A step that escapes its session, and one killed at its timeout with
    // a crowd of children still running.
    for (spec, ends) in [
        (
            "steps:\n  - name: escape\n    run: setsid sleep 7331 & setsid -f sh -c 'sleep 7332'; echo started\n",
            0,
        ),
        (
            "steps:\n  - name: crowd\n    timeout: 1s\n    run: for i in $(seq 50); do sleep 7333 & done; wait\n",
            1,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let output = build(dir.path(), spec, &[]);
        assert_eq!(output.status.code(), Some(ends), "{}", text(&output));
        let id = build_id(&output);
        let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
        let ps = String::from_utf8_lossy(&ps.stdout);
        assert!(
            !ps.lines().any(|l| l.starts_with("sleep 733")),
            "a step's process outlived its build:\n{ps}"
        );
        assert_no_cgroups(id.as_str());
    }

    // The daemon dies (kill -9) while a step runs: its runner stops the
    // step and cleans up before it goes.
    let dir = tempfile::tempdir().unwrap();
    let spec = "steps:\n  - name: long\n    run: sleep 7334 & sleep 7335\n";
    let (mut daemon, id) = start_build(dir.path(), spec, &[]);
    let runner = runner_pid(&id);
    job_file(runner, "workspace");
    std::thread::sleep(Duration::from_millis(500));
    daemon.kill().unwrap();
    let _ = daemon.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{runner}")).exists() {
        assert!(Instant::now() < deadline, "the runner outlived its daemon");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(!ps.lines().any(|l| l.starts_with("sleep 733")), "{ps}");
    assert_no_cgroups(&id);
}

/// No cgroup of the build `id` is left in any hierarchy.
fn assert_no_cgroups(id: &str) {
    for hierarchy in ["pids", "memory"] {
        let left: Vec<String> = fs_err::read_dir(format!("/sys/fs/cgroup/{hierarchy}"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(id))
            .collect();
        assert!(left.is_empty(), "cgroups left behind: {left:?}");
    }
}

#[test]
fn links_a_repository_plants_are_never_followed() {
    let victim = visible_dir();
    let victim_dir = victim.path().join("cron.d");
    fs_err::create_dir(&victim_dir).unwrap();
    let victim_file = victim.path().join("passwd");
    fs_err::write(&victim_file, "root:x:0:0\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    fs_err::create_dir_all(out.join("blobs")).unwrap();
    fs_err::write(out.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs_err::write(
        out.join("index.json"),
        r#"{"schemaVersion":2,"manifests":[]}"#,
    )
    .unwrap();
    std::os::unix::fs::symlink(&victim_dir, out.join("blobs/sha256")).unwrap();
    std::os::unix::fs::symlink(&victim_file, out.join(".index.json.tmp")).unwrap();
    fs_err::write(dir.path().join("notes.txt"), "notes\n").unwrap();
    custody_testkit::git(dir.path(), &["init", "-q"]);
    custody_testkit::git(dir.path(), &["add", "out", "notes.txt"]);
    custody_testkit::git(dir.path(), &["commit", "-qm", "planted"]);
    let spec = "steps:\n  - name: noop\n    run: 'true'\nartifacts:\n  - paths: [notes.txt]\n    to: oci:out:v1\n";
    let output = build(dir.path(), spec, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let log = text(&output);
    assert!(log.contains("symlink"), "{log}");
    assert!(
        log.contains("out/blobs/sha256") || log.contains("out/.index.json.tmp"),
        "{log}"
    );
    assert_eq!(fs_err::read_dir(&victim_dir).unwrap().count(), 0);
    assert_eq!(
        fs_err::read_to_string(&victim_file).unwrap(),
        "root:x:0:0\n"
    );
}

#[test]
fn a_build_cannot_write_through_links_another_build_planted() {
    let victim = visible_dir();
    let victim_dir = victim.path().join("cron.d");
    fs_err::create_dir(&victim_dir).unwrap();
    let victim_file = victim.path().join("passwd");
    fs_err::write(&victim_file, "root:x:0:0\n").unwrap();
    // Build A plants a layout of links in its /output and stays up.
    let a = tempfile::tempdir().unwrap();
    let plant = format!(
        r#"steps:
  - name: plant
    run: |
      mkdir -p /output/evil/blobs
      echo '{{"imageLayoutVersion":"1.0.0"}}' > /output/evil/oci-layout
      echo '{{"schemaVersion":2,"manifests":[]}}' > /output/evil/index.json
      ln -s {dir} /output/evil/blobs/sha256
      ln -s {file} /output/evil/.index.json.tmp
      touch /output/planted
      sleep 8
"#,
        dir = victim_dir.display(),
        file = victim_file.display()
    );
    let (a_build, a_id) = start_build(a.path(), &plant, &[]);
    let pid = runner_pid(&a_id);
    let planted = job_file(pid, "output/planted");
    let evil_via_proc = planted.with_file_name("evil");
    // What A's runner sees, as a host path without /proc (another runner
    // has its own mount namespace, where A's disk is not mounted).
    let evil_on_host = PathBuf::from("/").join(
        evil_via_proc
            .strip_prefix(format!("/proc/{pid}/root"))
            .unwrap(),
    );
    for target in [&evil_via_proc, &evil_on_host] {
        let b = tempfile::tempdir().unwrap();
        fs_err::write(b.path().join("f.txt"), "payload\n").unwrap();
        let spec = format!(
            "steps:\n  - name: noop\n    run: 'true'\nartifacts:\n  - paths: [f.txt]\n    to: oci:{}:v1\n",
            target.display()
        );
        let output = build(b.path(), &spec, &[]);
        if target == &evil_via_proc {
            assert_eq!(output.status.code(), Some(1), "{}", text(&output));
            assert!(text(&output).contains("symlink"), "{}", text(&output));
        }
        assert_eq!(
            fs_err::read_dir(&victim_dir).unwrap().count(),
            0,
            "{}",
            text(&output)
        );
        assert_eq!(
            fs_err::read_to_string(&victim_file).unwrap(),
            "root:x:0:0\n"
        );
    }
    let a_output = a_build.wait_with_output().unwrap();
    assert!(a_output.status.success(), "{}", text(&a_output));
}

#[test]
fn credential_files_the_daemon_reads_are_hidden_from_steps() {
    let registry = custody_testkit::Registry::builder()
        .basic_auth("carol", "pa55-in-a-file")
        .start();
    // Found through the environment, not `--authfile`, and world-readable.
    let config = visible_dir();
    let auth = config.path().join("auth.json");
    let docker = custody_testkit::write_docker_config(
        config.path(),
        registry.host(),
        "carol",
        "pa55-in-a-file",
    );
    fs_err::copy(docker.join("config.json"), &auth).unwrap();
    for file in [&auth, &docker.join("config.json")] {
        fs_err::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(dir.path().join("f.txt"), "payload\n").unwrap();
    let spec = format!(
        "steps:\n  - name: snoop\n    run: cat {auth} {docker}/config.json; echo done\nartifacts:\n  - paths: [f.txt]\n    to: {host}/t/files:v1\n",
        auth = auth.display(),
        docker = docker.display(),
        host = registry.host()
    );
    fs_err::write(dir.path().join("custody.yaml"), &spec).unwrap();
    let data = dir.path().join("data");
    let output = Command::new(CUSTODY)
        .args([
            "build",
            dir.path().to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .args(["--insecure-registry", registry.host()])
        .env("REGISTRY_AUTH_FILE", &auth)
        .env("DOCKER_CONFIG", &docker)
        .output()
        .unwrap();
    // The daemon used the password to push; the step never saw it.
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        !text(&output).contains("pa55-in-a-file"),
        "{}",
        text(&output)
    );
    assert!(!text(&output).contains("auths"), "{}", text(&output));
}

#[test]
fn other_local_users_cannot_read_a_running_build() {
    let dir = tempfile::tempdir().unwrap();
    let spec = "steps:\n  - name: work\n    env: { TOKENISH: canary-env-5e1f }\n    run: echo canary-file-9d2a > /workspace/secret && sleep 5\n";
    let (child, id) = start_build(dir.path(), spec, &[]);
    let pid = runner_pid(&id);
    job_file(pid, "workspace/secret");
    let data = dir.path().join("data");
    // `nobody` looks everywhere it might: argv and environments of every
    // process, the job directories, the store.
    let seen = as_nobody(&format!(
        // (the bracket keeps grep and this script from matching themselves)
        "cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c 'canary-env-5e1[f]'; \
         ls /tmp/custody-job-* 2>&1; cat /tmp/custody-job-*/disk/workspace/secret 2>&1; \
         cat {data}/custody.db 2>&1 | grep -c canary; ls {data} 2>&1",
        data = data.display()
    ));
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        seen.starts_with("0\n"),
        "nobody read the step's environment:\n{seen}"
    );
    assert!(!seen.contains("canary-file-9d2a"), "{seen}");
    assert!(seen.contains("Permission denied"), "{seen}");
    for (path, mode) in [(data.clone(), 0o700), (data.join("custody.db"), 0o600)] {
        let actual = fs_err::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(actual, mode, "{}", path.display());
    }
}

/// A gzip'd tar layer holding one file of `size` zeros; returns it and its diff_id.
fn zeros_layer(name: &str, size: usize) -> (custody_testkit::image::Blob, String) {
    use std::io::Write as _;
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, name, std::io::repeat(0).take(size as u64))
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let diff_id = custody_testkit::image::sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).unwrap();
    (
        custody_testkit::image::Blob::new(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gz.finish().unwrap(),
        ),
        diff_id,
    )
}

use std::io::Read as _;

#[test]
fn step_images_past_their_bounds_fail_before_the_disk_fills() {
    use custody_testkit::image::{Image, LayoutWriter};
    let registry = custody_testkit::Registry::builder().start();
    let work = tempfile::tempdir().unwrap();
    let push = |name: &str, image: &Image| -> String {
        let root = work.path().join(name);
        LayoutWriter::new(&root)
            .image(image)
            .tag("v1", &image.manifest);
        let tagged = format!("{}/bad/{name}:v1", registry.host());
        let pushed = custody(&[
            "push",
            "--insecure-registry",
            registry.host(),
            &format!("oci:{}:v1", root.display()),
            &tagged,
        ]);
        assert!(pushed.status.success(), "{}", text(&pushed));
        tagged
    };
    // 64 MiB of zeros in a layer of ~64 KiB.
    let (bomb, bomb_id) = zeros_layer("zeros", 64 << 20);
    assert!(bomb.bytes.len() < 1 << 20);
    let bomb = push(
        "bomb",
        &Image::from_layers(1, vec![bomb], vec![bomb_id], "amd64"),
    );
    let (layers, ids): (Vec<_>, Vec<_>) = (0..5).map(|i| zeros_layer(&format!("f{i}"), 10)).unzip();
    let many = push("many", &Image::from_layers(2, layers, ids, "amd64"));
    let (layer, _) = zeros_layer("f", 10);
    let lying = push(
        "lying",
        &Image::from_layers(
            3,
            vec![layer],
            vec![custody_testkit::image::sha256(b"something else")],
            "amd64",
        ),
    );
    let before = free_bytes(Path::new("/tmp"));
    for (image, reason) in [
        (bomb, "larger than the limit of 33554432 bytes uncompressed"),
        (many, "it has 5 layers; step images may have at most 4"),
        (lying, "does not match the image's config"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let spec = format!("steps:\n  - name: use\n    image: {image}\n    run: 'true'\n");
        let output = build(
            dir.path(),
            &spec,
            &[
                "--insecure-registry",
                registry.host(),
                "--max-image-size",
                "32MiB",
                "--max-image-layers",
                "4",
            ],
        );
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        assert!(
            text(&output).contains(reason),
            "expected `{reason}`:\n{}",
            text(&output)
        );
    }
    let after = free_bytes(Path::new("/tmp"));
    assert!(
        after + (64 << 20) > before,
        "{} MiB less free",
        (before - after) >> 20
    );
}

/// Hidden paths the steps' ids cannot even reach (a data directory inside
/// a 0700 directory) need no hiding, and must not stop the build.
#[test]
fn a_data_directory_out_of_the_steps_reach_is_no_obstacle() {
    let private = visible_dir();
    fs_err::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = private.path().join("data");
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(
        dir.path().join("custody.yaml"),
        "steps:\n  - name: look\n    run: ls -d / && echo looked\n",
    )
    .unwrap();
    let output = custody(&[
        "build",
        dir.path().to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        stdout(&output).contains("[look] looked"),
        "{}",
        text(&output)
    );
}

/// A runner that is not root keeps what bubblewrap can do unprivileged:
/// its own user maps to root inside, a network namespace with only `lo`;
/// it says what it cannot enforce, and refuses egress it cannot police.
#[test]
fn a_runner_that_is_not_root_keeps_what_it_can_and_says_what_it_cannot() {
    // Everything `nobody` needs, where `nobody` may reach it.
    let home = tempfile::tempdir().unwrap();
    fs_err::set_permissions(home.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let binary = home.path().join("custody");
    fs_err::copy(CUSTODY, &binary).unwrap();
    let project = home.path().join("project");
    fs_err::create_dir(&project).unwrap();
    fs_err::set_permissions(&project, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = |spec: &str| -> Output {
        fs_err::write(project.join("custody.yaml"), spec).unwrap();
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&binary)
            .args(["build"])
            .arg(&project)
            .arg("--data-dir")
            .arg(home.path().join("data"))
            .env("HOME", home.path())
            .output()
            .unwrap()
    };
    let output = run(
        "steps:\n  - name: look\n    run: |\n      echo map $(cat /proc/self/uid_map)\n      head -1 /etc/shadow || echo shadow-refused\n      echo interfaces $(tail -n +3 /proc/net/dev | cut -d: -f1)\n      unshare --user true || echo userns-refused\n",
    );
    assert!(output.status.success(), "{}", text(&output));
    let out = stdout(&output);
    assert!(out.contains("[look] map 0 65534 1"), "{out}");
    assert!(out.contains("[look] shadow-refused"), "{out}");
    assert!(out.contains("[look] interfaces lo"), "{out}");
    assert!(out.contains("[look] userns-refused"), "{out}");
    let log = text(&output);
    assert!(
        log.contains("disk limit of 20 GiB is not enforced: the runner is not root"),
        "{log}"
    );
    let statement = payload(
        &home
            .path()
            .join(format!("data/provenance/{}.dsse.json", build_id(&output))),
    );
    let notes =
        &statement["predicate"]["buildDefinition"]["internalParameters"]["sandbox"]["notes"];
    assert!(notes.as_array().is_some_and(|n| n.len() >= 2), "{notes}");
    assert_eq!(
        statement["predicate"]["buildDefinition"]["internalParameters"]["sandbox"]["diskBytes"],
        0
    );

    let output = run("steps:\n  - name: out\n    network: true\n    run: echo never\n");
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("cannot serve its egress proxy: the runner is not root"),
        "{}",
        text(&output)
    );
    assert!(!stdout(&output).contains("never"));
}

/// The step's environment is the step's, not bubblewrap's: while bubblewrap
/// still runs on the host, nothing a spec sets for the dynamic loader may
/// act on it (here: make it write a file into the host's /tmp), and a NUL
/// cannot smuggle an argument to it.
#[test]
fn a_steps_environment_never_acts_on_the_sandbox_itself() {
    let dir = tempfile::tempdir().unwrap();
    let probe = format!("/tmp/custody-ld-probe-{}", std::process::id());
    let spec = format!(
        "steps:\n  - name: loader\n    run: echo \"LD_DEBUG=$LD_DEBUG\"\n    env: {{ LD_DEBUG: files, LD_DEBUG_OUTPUT: {probe} }}\n"
    );
    let output = build(dir.path(), &spec, &[]);
    assert!(output.status.success(), "{}", text(&output));
    // The step itself got what it asked for.
    assert!(
        stdout(&output).contains("[loader] LD_DEBUG=files"),
        "{}",
        text(&output)
    );
    let written: Vec<_> = fs_err::read_dir("/tmp")
        .unwrap()
        .flatten()
        .filter(|e| e.path().to_string_lossy().starts_with(&probe))
        .map(|e| e.path())
        .collect();
    for path in &written {
        let _ = fs_err::remove_file(path);
    }
    assert!(
        written.is_empty(),
        "the host's loader obeyed the step: {written:?}"
    );

    // A NUL in a value would split it into arguments of bubblewrap's own.
    let spec = "steps:\n  - name: smuggle\n    run: ls /hostroot || echo not-mounted\n    env: { X: \"a\\0--bind\\0/\\0/hostroot\" }\n";
    let output = build(dir.path(), spec, &[]);
    assert_ne!(output.status.code(), Some(0), "{}", text(&output));
    assert!(!stdout(&output).contains("[smuggle]"), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("the environment variable `X` cannot be set"),
        "{}",
        text(&output)
    );
}
