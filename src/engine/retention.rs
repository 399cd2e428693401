//! Which backups a retention policy keeps: Proxmox Backup Server's prune
//! semantics (its manual, "Prune"), on VM-level backups.
//!
//! The backups of one VM are taken newest first. The options are applied in
//! the order keep-last, keep-hourly, keep-daily, keep-weekly (ISO weeks),
//! keep-monthly, keep-yearly. Each option walks the backups that no earlier
//! option has decided on and keeps the newest backup of each of its N newest
//! periods that an earlier option has not already covered (a period is the
//! backup itself for keep-last). A backup whose period a newer backup of the
//! same option already holds is marked for removal at once, and no later
//! option considers it. Periods without a backup do not count. Protected
//! backups are never removed and do not use up a period. Everything no
//! option keeps is removed. With no option set at all, everything is kept.
//!
//! Unfinished backups (failed or interrupted ones that hold no point) are
//! records only: the newest one is kept while no finished backup is newer
//! than it (so the last failure stays visible), older ones are removed.
//! Running backups are never touched and take no part.
//!
//! This module is pure: it sees times, flags and options, and decides.

use serde::{Deserialize, Serialize};

/// How many periods of each kind to keep. `None` or `Some(0)`: the option is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
}

/// One retention option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    KeepLast,
    KeepHourly,
    KeepDaily,
    KeepWeekly,
    KeepMonthly,
    KeepYearly,
}

impl Rule {
    /// The options in the order they are applied.
    pub const ALL: [Rule; 6] = [
        Rule::KeepLast,
        Rule::KeepHourly,
        Rule::KeepDaily,
        Rule::KeepWeekly,
        Rule::KeepMonthly,
        Rule::KeepYearly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::KeepLast => "keep-last",
            Rule::KeepHourly => "keep-hourly",
            Rule::KeepDaily => "keep-daily",
            Rule::KeepWeekly => "keep-weekly",
            Rule::KeepMonthly => "keep-monthly",
            Rule::KeepYearly => "keep-yearly",
        }
    }
}

impl KeepOptions {
    /// The count of `r` (0 when off).
    pub fn get(&self, r: Rule) -> u32 {
        self.get_opt(r).unwrap_or(0)
    }

    pub fn set(&mut self, r: Rule, n: Option<u32>) {
        let slot = match r {
            Rule::KeepLast => &mut self.keep_last,
            Rule::KeepHourly => &mut self.keep_hourly,
            Rule::KeepDaily => &mut self.keep_daily,
            Rule::KeepWeekly => &mut self.keep_weekly,
            Rule::KeepMonthly => &mut self.keep_monthly,
            Rule::KeepYearly => &mut self.keep_yearly,
        };
        *slot = n;
    }

    /// True when at least one option is on (otherwise prune keeps everything).
    pub fn keeps_something(&self) -> bool {
        Rule::ALL.iter().any(|r| self.get(*r) > 0)
    }

    /// The options given in `over` replace these.
    pub fn overridden_by(&self, over: &KeepOptions) -> KeepOptions {
        let mut out = *self;
        for r in Rule::ALL {
            if let Some(n) = over.get_opt(r) {
                out.set(r, Some(n));
            }
        }
        out
    }

    fn get_opt(&self, r: Rule) -> Option<u32> {
        match r {
            Rule::KeepLast => self.keep_last,
            Rule::KeepHourly => self.keep_hourly,
            Rule::KeepDaily => self.keep_daily,
            Rule::KeepWeekly => self.keep_weekly,
            Rule::KeepMonthly => self.keep_monthly,
            Rule::KeepYearly => self.keep_yearly,
        }
    }

    /// Human form: "keep-last 3, keep-daily 7" (or "keep everything").
    pub fn describe(&self) -> String {
        let parts: Vec<String> = Rule::ALL
            .iter()
            .filter(|r| self.get(**r) > 0)
            .map(|r| format!("{} {}", r.as_str(), self.get(*r)))
            .collect();
        if parts.is_empty() {
            "no keep option (keeps everything)".into()
        } else {
            parts.join(", ")
        }
    }
}

/// What prune does with one backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// An option keeps it.
    Keep,
    /// The newest unfinished backup, kept while nothing finished is newer.
    KeepPartial,
    /// Protected: never removed.
    Protected,
    /// Running: prune does not touch it.
    Running,
    Remove,
}

/// One backup, as retention sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Seconds since the epoch (the backup's created_at).
    pub time: i64,
    /// Holds at least one completed point.
    pub finished: bool,
    pub protected: bool,
    pub running: bool,
}

/// The decision for one candidate: what, and which option keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub verdict: Verdict,
    pub rule: Option<Rule>,
}

/// Decide every candidate; the result is indexed like the input. Give the
/// candidates oldest first: of two with the same time (to the second), the
/// later in the input is taken as the newer. `tz` places each backup in its
/// calendar periods.
pub fn decide(cands: &[Candidate], opts: &KeepOptions, tz: &jiff::tz::TimeZone) -> Vec<Mark> {
    let mut order: Vec<usize> = (0..cands.len()).collect();
    // Newest first; equal times: the later in the input first.
    order.sort_by(|a, b| cands[*b].time.cmp(&cands[*a].time).then(b.cmp(a)));
    let mut marks: Vec<Option<Mark>> = vec![None; cands.len()];
    let mark = |v, r| {
        Some(Mark {
            verdict: v,
            rule: r,
        })
    };

    for &i in &order {
        if cands[i].running {
            marks[i] = mark(Verdict::Running, None);
        }
    }
    if !opts.keeps_something() {
        return (0..cands.len())
            .map(|i| {
                marks[i].unwrap_or(Mark {
                    verdict: if cands[i].protected {
                        Verdict::Protected
                    } else {
                        Verdict::Keep
                    },
                    rule: None,
                })
            })
            .collect();
    }

    // Unfinished records: the newest one survives unless something finished is newer.
    let mut keep_unfinished = true;
    for &i in &order {
        if marks[i].is_some() {
            continue;
        }
        if cands[i].finished {
            keep_unfinished = false;
        } else {
            marks[i] = if cands[i].protected {
                mark(Verdict::Protected, None)
            } else if keep_unfinished {
                mark(Verdict::KeepPartial, None)
            } else {
                mark(Verdict::Remove, None)
            };
            keep_unfinished = false;
        }
    }

    for rule in Rule::ALL {
        let n = opts.get(rule) as usize;
        if n == 0 {
            continue;
        }
        let key = |i: usize| period(rule, cands[i].time, i, tz);
        let already: std::collections::HashSet<[i64; 4]> = order
            .iter()
            .filter(|&&i| matches!(marks[i], Some(m) if m.verdict == Verdict::Keep))
            .map(|&i| key(i))
            .collect();
        let mut chosen = std::collections::HashSet::new();
        for &i in &order {
            if marks[i].is_some() {
                continue;
            }
            if cands[i].protected {
                marks[i] = mark(Verdict::Protected, None);
                continue;
            }
            let k = key(i);
            if already.contains(&k) {
                continue;
            }
            if chosen.contains(&k) {
                marks[i] = mark(Verdict::Remove, None);
            } else {
                if chosen.len() >= n {
                    break;
                }
                chosen.insert(k);
                marks[i] = mark(Verdict::Keep, Some(rule));
            }
        }
    }

    (0..cands.len())
        .map(|i| {
            if cands[i].protected && !cands[i].running {
                return Mark {
                    verdict: Verdict::Protected,
                    rule: None,
                };
            }
            marks[i].unwrap_or(Mark {
                verdict: Verdict::Remove,
                rule: None,
            })
        })
        .collect()
}

/// The calendar period of `time` for `rule` (keep-last: the backup itself).
fn period(rule: Rule, time: i64, index: usize, tz: &jiff::tz::TimeZone) -> [i64; 4] {
    let z = jiff::Timestamp::from_second(time)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_zoned(tz.clone());
    let (y, m, d, h) = (
        z.year() as i64,
        z.month() as i64,
        z.day() as i64,
        z.hour() as i64,
    );
    match rule {
        Rule::KeepLast => [0, time, index as i64, 0],
        Rule::KeepHourly => [y, m, d, h],
        Rule::KeepDaily => [y, m, d, -1],
        Rule::KeepWeekly => {
            let w = z.date().iso_week_date();
            [w.year() as i64, w.week() as i64, -1, -2]
        }
        Rule::KeepMonthly => [y, m, -1, -3],
        Rule::KeepYearly => [y, -1, -1, -4],
    }
}

/// Parse a policy's time zone: an IANA name ("Europe/Berlin"), "UTC", or a
/// fixed offset ("+02:00").
pub fn time_zone(name: Option<&str>) -> Result<jiff::tz::TimeZone, String> {
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Ok(jiff::tz::TimeZone::UTC);
    };
    if name.eq_ignore_ascii_case("utc") || name == "Z" {
        return Ok(jiff::tz::TimeZone::UTC);
    }
    if let Some(sign) = name.chars().next().filter(|c| *c == '+' || *c == '-') {
        let rest = &name[1..];
        let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
        let (h, m): (i32, i32) = match (h.parse(), m.parse()) {
            (Ok(h), Ok(m)) if h <= 23 && m <= 59 => (h, m),
            _ => {
                return Err(format!(
                    "time zone {name:?}: a fixed offset is written like +02:00"
                ))
            }
        };
        let secs = (h * 3600 + m * 60) * if sign == '-' { -1 } else { 1 };
        return jiff::tz::Offset::from_seconds(secs)
            .map(jiff::tz::TimeZone::fixed)
            .map_err(|e| format!("time zone {name:?}: {e}"));
    }
    jiff::tz::TimeZone::get(name).map_err(|e| {
        format!("time zone {name:?} is not known ({e}); use an IANA name such as Europe/Berlin, UTC, or an offset such as +02:00")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_second()
    }

    fn cand(s: &str) -> Candidate {
        Candidate {
            time: at(s),
            finished: true,
            protected: false,
            running: false,
        }
    }

    fn kept(c: &[Candidate], o: &KeepOptions) -> Vec<usize> {
        decide(c, o, &jiff::tz::TimeZone::UTC)
            .iter()
            .enumerate()
            .filter(|(_, m)| m.verdict != Verdict::Remove)
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn no_option_keeps_everything() {
        let c = vec![cand("2026-01-01T00:00:00Z"), cand("2026-01-02T00:00:00Z")];
        assert_eq!(kept(&c, &KeepOptions::default()), vec![0, 1]);
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let c: Vec<_> = (1..=5)
            .map(|d| cand(&format!("2026-01-0{d}T00:00:00Z")))
            .collect();
        let o = KeepOptions {
            keep_last: Some(2),
            ..Default::default()
        };
        assert_eq!(kept(&c, &o), vec![3, 4]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_and_skips_empty_days() {
        let c = vec![
            cand("2026-03-01T01:00:00Z"),
            cand("2026-03-01T23:00:00Z"),
            cand("2026-03-03T05:00:00Z"),
            cand("2026-03-03T06:00:00Z"),
            cand("2026-03-07T06:00:00Z"),
        ];
        let o = KeepOptions {
            keep_daily: Some(3),
            ..Default::default()
        };
        assert_eq!(kept(&c, &o), vec![1, 3, 4]);
    }

    #[test]
    fn a_week_across_two_months_is_decided_by_weekly_first() {
        // Mon 2026-06-29 .. Sun 2026-07-05 is ISO week 27. Weekly keeps the
        // newest of the week (July 2nd); June 30th is in the same week, so it
        // is marked for removal and monthly does not see it: monthly's June
        // slot goes to June 20th.
        let c = vec![
            cand("2026-06-20T00:00:00Z"),
            cand("2026-06-30T00:00:00Z"),
            cand("2026-07-02T00:00:00Z"),
        ];
        let o = KeepOptions {
            keep_weekly: Some(1),
            keep_monthly: Some(2),
            ..Default::default()
        };
        let m = decide(&c, &o, &jiff::tz::TimeZone::UTC);
        assert_eq!(m[2].rule, Some(Rule::KeepWeekly));
        assert_eq!(m[1].verdict, Verdict::Remove);
        assert_eq!(m[0].rule, Some(Rule::KeepMonthly));
    }

    #[test]
    fn protected_and_unfinished() {
        let mut c = vec![
            cand("2026-01-01T00:00:00Z"),
            cand("2026-01-02T00:00:00Z"),
            cand("2026-01-03T00:00:00Z"),
            cand("2026-01-04T00:00:00Z"),
        ];
        c[0].protected = true;
        c[1].finished = false;
        c[3].finished = false;
        let o = KeepOptions {
            keep_last: Some(1),
            ..Default::default()
        };
        let m = decide(&c, &o, &jiff::tz::TimeZone::UTC);
        let v: Vec<Verdict> = m.iter().map(|m| m.verdict).collect();
        assert_eq!(
            v,
            vec![
                Verdict::Protected,
                Verdict::Remove,
                Verdict::Keep,
                Verdict::KeepPartial
            ]
        );
    }

    #[test]
    fn time_zones_move_days() {
        // 23:30 UTC on the 1st is the 2nd in Berlin.
        let c = vec![cand("2026-01-01T22:00:00Z"), cand("2026-01-01T23:30:00Z")];
        let o = KeepOptions {
            keep_daily: Some(5),
            ..Default::default()
        };
        assert_eq!(kept(&c, &o), vec![1]);
        let tz = time_zone(Some("+01:00")).unwrap();
        let n = decide(&c, &o, &tz)
            .iter()
            .filter(|m| m.verdict == Verdict::Keep)
            .count();
        assert_eq!(n, 2);
        assert!(time_zone(Some("Mars/Olympus")).is_err());
        assert!(time_zone(Some("+25:00")).is_err());
    }
}
