//! `charts/tests/exported_metrics.txt`, the list the chart's dashboard check holds
//! every panel's PromQL to (docs/operations.md, "Dashboard"), is the services'
//! metrics: it names exactly the families the services' `metrics.rs` register, and
//! every family the real binaries export, with its type. (A family with labels is
//! exported only once it has a child, so a scrape alone cannot show them all.)

use std::collections::BTreeSet;

use payledger_e2e::Harness;
use payledger_server_common::local_nats::free_port;

/// `name type` of every `# TYPE` line of a Prometheus text scrape.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(str::to_string)
        .collect()
}

fn listed() -> anyhow::Result<BTreeSet<String>> {
    Ok(std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/tests/exported_metrics.txt"
    ))?
    .lines()
    .filter(|l| !l.is_empty() && !l.starts_with('#'))
    .map(str::to_string)
    .collect())
}

/// The `"payledger_…"` names in the services' metrics modules.
fn registered() -> anyhow::Result<BTreeSet<String>> {
    let services = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../services");
    let mut names = BTreeSet::new();
    for service in std::fs::read_dir(services)? {
        let path = service?.path().join("src/metrics.rs");
        let Ok(source) = std::fs::read_to_string(&path) else {
            continue;
        };
        for quoted in source.split('"').skip(1).step_by(2) {
            if quoted.starts_with("payledger_")
                && quoted.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                names.insert(quoted.to_string());
            }
        }
    }
    Ok(names)
}

#[test]
fn the_chart_lists_the_families_the_services_register() -> anyhow::Result<()> {
    let listed: BTreeSet<String> = listed()?
        .iter()
        .filter_map(|l| l.split_once(' ').map(|(name, _)| name.to_string()))
        .collect();
    let registered = registered()?;
    assert!(registered.len() > 10, "{registered:?}");
    assert_eq!(
        listed, registered,
        "charts/tests/exported_metrics.txt and the services' metrics.rs name different families"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_lists_what_the_binaries_export_with_its_type() -> anyhow::Result<()> {
    let listed = listed()?;
    let mut h = Harness::start()?;
    let store = h.store();
    let projector_store = format!("{store}-projector");
    let mut exported = BTreeSet::new();
    let mut services = Vec::new();
    for (binary, args) in [
        // With an archive store, so that the archiver runs and reports.
        ("payledger-ingest", vec!["--archive-store", store.as_str()]),
        (
            "payledger-projector",
            vec![
                "--store",
                projector_store.as_str(),
                "--archive-store",
                store.as_str(),
            ],
        ),
        ("payledger-query", vec!["--store", store.as_str()]),
        (
            "payledger-replay-coordinator",
            vec!["--store", store.as_str(), "--workers", "http://127.0.0.1:1"],
        ),
    ] {
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let mut all = vec!["--metrics-listen", metrics.as_str()];
        all.extend(args);
        services.push(h.spawn(binary, &all).await?);
        let text = payledger_e2e::scrape_metrics(&metrics).await?;
        let found = families(&text);
        assert!(!found.is_empty(), "{binary} exports no metric:\n{text}");
        exported.extend(found);
    }
    let unlisted: Vec<_> = exported.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "exported but not in charts/tests/exported_metrics.txt (or with another type): {unlisted:?}"
    );
    // What a start exports: every service's families without labels, and the
    // projector's partitions once it owns them.
    assert!(exported.len() >= 12, "{exported:?}");
    Ok(())
}
