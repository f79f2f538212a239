//! custody.yaml: what parses, and how what does not is reported.

use std::path::Path;
use std::time::Duration;

use custody_daemon::spec::{Command, Values, parse};
use custody_oci::Location;

const FULL: &str = r#"source:
  git: https://example.org/app.git
  revision: main
disk: 5GiB
steps:
  - name: build
    image: 127.0.0.1:5000/tools/builder@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
    run: make image OUT=/output/app
    env: { KEY: value }
    timeout: 10m
  - name: test
    args: [make, test]
    network: true
    timeout: 90
images:
  - from: oci:/output/app
    to: 127.0.0.1:5000/team/app:{revision}
artifacts:
  - paths: ["dist/*.tar.gz"]
    to: oci:/srv/out:{short_commit}
"#;

fn file() -> &'static Path {
    Path::new("app/custody.yaml")
}

#[test]
fn a_full_spec_parses() {
    let spec = parse(FULL, file()).unwrap();
    let source = spec.source.unwrap();
    assert_eq!(
        (source.git.as_str(), source.revision.as_str()),
        ("https://example.org/app.git", "main")
    );
    assert_eq!(spec.disk, Some(5 << 30));
    assert_eq!(spec.steps.len(), 2);
    assert_eq!(
        spec.steps[0].command,
        Command::Run("make image OUT=/output/app".into())
    );
    assert_eq!(spec.steps[0].timeout, Some(Duration::from_secs(600)));
    assert!(!spec.steps[0].network);
    assert_eq!(
        spec.steps[1].command,
        Command::Args(vec!["make".into(), "test".into()])
    );
    assert_eq!(spec.steps[1].timeout, Some(Duration::from_secs(90)));
    assert!(spec.steps[1].network);
    assert_eq!(
        spec.steps[0].env.get("KEY").map(String::as_str),
        Some("value")
    );
    let values = Values {
        revision: "main",
        commit: "0123456789abcdef0123456789abcdef01234567",
        job: "j1",
    };
    assert_eq!(
        spec.images[0].to.resolve(&values).unwrap().to_string(),
        "127.0.0.1:5000/team/app:main"
    );
    assert_eq!(
        spec.artifacts[0].to.resolve(&values).unwrap(),
        Location::Layout {
            path: "/srv/out".into(),
            tag: Some("0123456789ab".into())
        }
    );
}

#[track_caller]
fn error_of(text: &str) -> String {
    parse(text, file()).unwrap_err().to_string()
}

#[test]
fn syntax_and_type_errors_name_the_file_line_and_column() {
    let err = error_of("steps:\n  - name: a\n    run: x\n    netwrk: true\n");
    assert!(
        err.starts_with("app/custody.yaml:4:5: unknown field `netwrk`"),
        "{err}"
    );
    assert!(
        !err.lines().next().unwrap().contains("at line"),
        "the location is said once: {err}"
    );
    assert!(
        err.contains("4 |     netwrk: true"),
        "the line is shown: {err}"
    );

    let err = error_of("steps:\n  - name: a\n    run: x\n    network: maybe\n");
    assert!(err.starts_with("app/custody.yaml:4:14: "), "{err}");
    assert!(err.contains("boolean"), "{err}");

    let err = error_of("steps:\n  - run: x\n");
    assert!(
        err.starts_with("app/custody.yaml:2:") && err.contains("missing field `name`"),
        "{err}"
    );

    let err = error_of("steps: [\n");
    assert!(err.starts_with("app/custody.yaml:1:"), "{err}");

    // A tab is reported where it is, not where the scanner's token began.
    for (text, at) in [
        ("steps:\n  - name: a\n\trun: echo hi\n", "3:1"),
        (
            "steps:\n  - name: a\n    run: x\n    env:\n  \t  A: b\n",
            "5:3",
        ),
    ] {
        let err = error_of(text);
        assert!(
            err.starts_with(&format!("app/custody.yaml:{at}: a tab in the indentation")),
            "{err}"
        );
    }
}

#[test]
fn values_that_make_no_sense_are_located_too() {
    let err = error_of("steps:\n  - name: a\n    run: x\n  - name: a\n    run: y\n");
    assert!(
        err.starts_with("app/custody.yaml:4:") && err.contains("already exists"),
        "{err}"
    );

    let err = error_of("steps:\n  - name: a\n    run: x\n    args: [y]\n");
    assert!(err.contains("both `run` and `args`"), "{err}");

    let err = error_of("steps:\n  - name: a\n");
    assert!(err.contains("needs `run` or `args`"), "{err}");

    let err = error_of("steps:\n  - name: a\n    image: Tools/Builder\n    run: x\n");
    assert!(
        err.starts_with("app/custody.yaml:3:") && err.contains("Tools/Builder"),
        "{err}"
    );

    let err = error_of("steps:\n  - name: a\n    run: x\n    timeout: soon\n");
    assert!(
        err.starts_with("app/custody.yaml:4:") && err.contains("not a duration"),
        "{err}"
    );

    let err = error_of(
        "steps:\n  - name: a\n    run: x\nimages:\n  - from: oci:/etc/app\n    to: oci:/tmp/x\n",
    );
    assert!(
        err.starts_with("app/custody.yaml:5:") && err.contains("not under `/output`"),
        "{err}"
    );

    let err = error_of(
        "steps:\n  - name: a\n    run: x\nimages:\n  - from: oci:/output/../etc\n    to: oci:/tmp/x\n",
    );
    assert!(err.contains("not under `/output`"), "{err}");

    let err = error_of(
        "steps:\n  - name: a\n    run: x\nimages:\n  - from: oci:/output/app\n    to: reg.example/app:{branch}\n",
    );
    assert!(
        err.starts_with("app/custody.yaml:6:")
            && err.contains("`{branch}`")
            && err.contains("`{revision}`"),
        "{err}"
    );

    let err = error_of(
        "steps:\n  - name: a\n    run: x\nimages:\n  - from: oci:/output/app\n    to: docker-archive:/tmp/x.tar\n",
    );
    assert!(err.contains("can only be read"), "{err}");

    let err = error_of(
        "steps:\n  - name: a\n    run: x\nartifacts:\n  - paths: [\"../secret\"]\n    to: oci:/tmp/x\n",
    );
    assert!(
        err.starts_with("app/custody.yaml:5:") && err.contains("inside the workspace"),
        "{err}"
    );

    let err = error_of("steps: []\n");
    assert!(err.contains("at least one step"), "{err}");
}

#[test]
fn a_disk_too_small_or_not_a_size_is_located() {
    for bad in ["disk: 1MiB", "disk: lots", "disk: 5TB"] {
        let text = format!("{bad}\nsteps:\n  - name: a\n    run: x\n");
        let err = parse(&text, file()).unwrap_err().to_string();
        assert!(
            err.starts_with("app/custody.yaml:1:7: ") && err.contains("at least 64MiB"),
            "{err}"
        );
    }
    let spec = parse("steps:\n  - name: a\n    run: x\n", file()).unwrap();
    assert_eq!(spec.disk, None, "the daemon's default applies");
}

#[test]
fn pushes_parse_and_their_mistakes_are_located() {
    let text = "steps:\n  - name: a\n    run: x\npushes:\n  - name: team/app\n    to: 127.0.0.1:5000/team/app-{revision}\n";
    let spec = parse(text, file()).unwrap();
    assert_eq!(spec.pushes.len(), 1);
    assert_eq!(spec.pushes[0].name.as_str(), "team/app");
    let values = Values {
        revision: "main",
        commit: "0123456789abcdef0123456789abcdef01234567",
        job: "j1",
    };
    assert_eq!(
        spec.pushes[0].to.resolve(&values).unwrap().to_string(),
        "127.0.0.1:5000/team/app-main"
    );

    let with = |pushes: &str| {
        error_of(&format!(
            "steps:\n  - name: a\n    run: x\npushes:\n{pushes}"
        ))
    };
    let err = with("  - name: app\n    to: reg.example/app\n    tag: v1\n");
    assert!(
        err.starts_with("app/custody.yaml:7:5: unknown field `tag`"),
        "{err}"
    );
    let err = with("  - name: App\n    to: reg.example/app\n");
    assert!(
        err.starts_with("app/custody.yaml:5:") && err.contains("not a valid repository name"),
        "{err}"
    );
    let err = with("  - name: app\n    to: reg.example/app:v1\n");
    assert!(
        err.starts_with("app/custody.yaml:6:") && err.contains("without tag or digest"),
        "{err}"
    );
    let err = with("  - name: app\n    to: oci:/srv/out\n");
    assert!(
        err.starts_with("app/custody.yaml:6:") && err.contains("registry repository"),
        "{err}"
    );
    let err = with("  - name: app\n    to: reg.example/a\n  - name: app\n    to: reg.example/b\n");
    assert!(
        err.starts_with("app/custody.yaml:7:") && err.contains("already declared"),
        "{err}"
    );
    let err = with("  - name: app\n    to: reg.example/{branch}\n");
    assert!(
        err.starts_with("app/custody.yaml:6:") && err.contains("`{branch}`"),
        "{err}"
    );
}

#[test]
fn network_may_be_a_host_list_and_its_mistakes_are_located() {
    let text = "steps:\n  - name: deps\n    run: x\n    network: [\"pypi.org\", \"*.pythonhosted.org\", \"mirror.example:8080\"]\n";
    let spec = parse(text, file()).unwrap();
    assert!(spec.steps[0].network);
    let hosts: Vec<String> = spec.steps[0].hosts.iter().map(|h| h.to_string()).collect();
    assert_eq!(
        hosts,
        ["pypi.org", "*.pythonhosted.org", "mirror.example:8080"]
    );
    for (network, expected) in [("true", true), ("false", false)] {
        let text = format!("steps:\n  - name: a\n    run: x\n    network: {network}\n");
        let spec = parse(&text, file()).unwrap();
        assert_eq!(spec.steps[0].network, expected);
        assert!(spec.steps[0].hosts.is_empty());
    }

    let err = error_of(
        "steps:\n  - name: a\n    run: x\n    network:\n      - pypi.org\n      - \"bad host\"\n",
    );
    assert!(
        err.starts_with("app/custody.yaml:6:9: ") && err.contains("`bad host`"),
        "{err}"
    );
    let err = error_of("steps:\n  - name: a\n    run: x\n    network: []\n");
    assert!(
        err.starts_with("app/custody.yaml:2:") && err.contains("empty `network` list"),
        "{err}"
    );
    let err = error_of("steps:\n  - name: a\n    run: x\n    network: { pypi.org: 1 }\n");
    assert!(
        err.starts_with("app/custody.yaml:4:") && err.contains("list of host patterns"),
        "{err}"
    );
}

#[test]
fn pulls_parse_and_their_mistakes_are_located() {
    let text = "steps:\n  - name: a\n    run: x\npulls:\n  - name: base\n    from: 127.0.0.1:5000/library/debian\n";
    let spec = parse(text, file()).unwrap();
    assert_eq!(spec.pulls.len(), 1);
    assert_eq!(spec.pulls[0].name.as_str(), "base");
    assert_eq!(
        spec.pulls[0].from.to_string(),
        "127.0.0.1:5000/library/debian"
    );
    assert_eq!((spec.pulls[0].line, spec.pulls[0].column), (6, 11));

    let with = |pulls: &str| error_of(&format!("steps:\n  - name: a\n    run: x\npulls:\n{pulls}"));
    let err = with("  - name: base\n    from: reg.example/base:v1\n");
    assert!(
        err.starts_with("app/custody.yaml:6:") && err.contains("without tag or digest"),
        "{err}"
    );
    let err = with("  - name: Base\n    from: reg.example/base\n");
    assert!(
        err.starts_with("app/custody.yaml:5:") && err.contains("not a valid repository name"),
        "{err}"
    );
    let err = with("  - name: base\n    to: reg.example/base\n");
    assert!(err.contains("unknown field `to`"), "{err}");
    let err = with("  - name: b\n    from: reg.example/a\n  - name: b\n    from: reg.example/b\n");
    assert!(
        err.starts_with("app/custody.yaml:7:") && err.contains("already declared"),
        "{err}"
    );
    let err = error_of(
        "steps:\n  - name: a\n    run: x\npushes:\n  - name: app\n    to: reg.example/app\npulls:\n  - name: app\n    from: reg.example/app\n",
    );
    assert!(
        err.starts_with("app/custody.yaml:8:") && err.contains("also declared in `pushes`"),
        "{err}"
    );
}
