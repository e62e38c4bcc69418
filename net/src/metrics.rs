//! The Prometheus text format, written by hand: both binaries render a
//! few counters and histograms and need no metrics library for it.

use std::fmt::Write;

/// `# HELP` and `# TYPE` lines.
pub fn metric_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One unlabelled or labelled sample; label values are escaped.
pub fn metric_sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        metric_header(&mut out, "x", "counter", "Things.");
        metric_sample(&mut out, "x", &[("tunnel", "a\"b\\c\nd")], 1);
        metric_sample(&mut out, "y", &[], 2);
        assert_eq!(
            out,
            "# HELP x Things.\n# TYPE x counter\nx{tunnel=\"a\\\"b\\\\c\\nd\"} 1\ny 2\n"
        );
    }
}
