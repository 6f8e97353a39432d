//! The checklist `doctor` prints: one line per check with what it saw and, for a failure,
//! the fix; or the same as JSON (`--json`).

use serde::Serialize;

/// How a check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Works, but something deserves attention (check-config's warnings); not a failure.
    Warn,
    /// Not run: an earlier check failed, or the running agent answered for it.
    Skip,
}

/// One line of the checklist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked: `config`, `certificate`, `dns`, `tcp`, `tls`, `mqtt-connect`,
    /// `mqtt-subscribe`, `data-plane`, `clock`.
    pub name: &'static str,
    /// What it was checked against: a file, `host:port`, a thing, a region.
    pub target: String,
    pub status: Status,
    /// What the check saw.
    pub saw: String,
    /// For a failure: the setting or policy statement to change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(name: &'static str, target: impl Into<String>, saw: impl Into<String>) -> Check {
        Check {
            name,
            target: target.into(),
            status: Status::Pass,
            saw: saw.into(),
            fix: None,
        }
    }

    pub fn fail(
        name: &'static str,
        target: impl Into<String>,
        saw: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        let fix = fix.into();
        debug_assert!(!fix.is_empty(), "every failure names its fix: {name}");
        Check {
            name,
            target: target.into(),
            status: Status::Fail,
            saw: saw.into(),
            fix: Some(fix),
        }
    }

    pub fn warn(name: &'static str, target: impl Into<String>, saw: impl Into<String>) -> Check {
        Check {
            name,
            target: target.into(),
            status: Status::Warn,
            saw: saw.into(),
            fix: None,
        }
    }

    pub fn skip(name: &'static str, target: impl Into<String>, why: impl Into<String>) -> Check {
        Check {
            name,
            target: target.into(),
            status: Status::Skip,
            saw: why.into(),
            fix: None,
        }
    }
}

/// Every check, in the order run.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Every check passed (skipped ones aside).
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    /// Adds a check; returns whether it passed, so a step can stop at a failure.
    pub fn add(&mut self, check: Check) -> bool {
        let passed = check.status != Status::Fail;
        self.checks.push(check);
        self.ok = self.failed() == 0;
        passed
    }

    pub fn failed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count()
    }

    /// Rule (doctor's exit code): 0 when every check passed, 1 when one failed.
    pub fn exit_code(&self) -> u8 {
        if self.failed() == 0 { 0 } else { 1 }
    }

    /// The checklist as text, a line per check and an indented `fix:` under a failure.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let mark = match c.status {
                Status::Pass => " ok ",
                Status::Fail => "FAIL",
                Status::Warn => "warn",
                Status::Skip => "skip",
            };
            out.push_str(&format!("[{mark}] {} {}: {}\n", c.name, c.target, c.saw));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("       fix: {fix}\n"));
            }
        }
        let verdict = match self.failed() {
            0 => "all checks passed".to_owned(),
            1 => "1 check failed".to_owned(),
            n => format!("{n} checks failed"),
        };
        out.push_str(&verdict);
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_check_makes_the_exit_code_1_and_a_skipped_one_does_not() {
        let mut r = Report::default();
        assert!(r.add(Check::pass("dns", "h", "resolves")));
        assert!(r.add(Check::skip("mqtt-connect", "h", "the agent answered")));
        assert!(r.add(Check::warn("config", "f", "mqtt.key is readable by others")));
        assert_eq!(r.exit_code(), 0);
        assert!(r.ok);
        assert!(!r.add(Check::fail("tls", "h:8883", "unknown CA", "set mqtt.ca")));
        assert_eq!(r.exit_code(), 1);
        assert!(!r.ok);
    }

    #[test]
    fn the_text_puts_each_fix_under_its_failure() {
        let mut r = Report::default();
        r.add(Check::pass("dns", "h", "resolves to 127.0.0.1"));
        r.add(Check::fail("tls", "h:8883", "unknown CA", "set mqtt.ca"));
        assert_eq!(
            r.render(),
            "[ ok ] dns h: resolves to 127.0.0.1\n[FAIL] tls h:8883: unknown CA\n       fix: set mqtt.ca\n1 check failed\n"
        );
    }
}
