//! Who leads and who writes checkpoints, from the daemons' own answers to
//! `Control.Status`: the harness resolves `"leader"`, `"non-leader"` and the checkpoint
//! writer this way, so it works while etcd is down. Pure; the harness does the asking.

/// What one daemon's `Control.Status` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// The generation it is in.
    pub generation: u64,
    /// Whether it says it leads.
    pub leader: bool,
    /// The global ranks it hosts.
    pub ranks: Vec<u32>,
}

/// The roles found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    /// The leader's node index.
    pub leader: Option<usize>,
    /// The node hosting rank 0 (it writes the checkpoints).
    pub rank0: Option<usize>,
}

/// The roles from the daemons that answered (`(node index, status)`): only daemons in
/// the newest generation any of them reports count (one left behind in an older
/// generation may still believe it leads); among those, the lowest index claiming each
/// role.
pub fn pick_roles(answers: &[(usize, NodeStatus)]) -> Roles {
    let Some(g) = answers.iter().map(|(_, s)| s.generation).max() else {
        return Roles::default();
    };
    let newest = || {
        let mut v: Vec<&(usize, NodeStatus)> =
            answers.iter().filter(|(_, s)| s.generation == g).collect();
        v.sort_by_key(|(n, _)| *n);
        v.into_iter()
    };
    Roles {
        leader: newest().find(|(_, s)| s.leader).map(|(n, _)| *n),
        rank0: newest()
            .find(|(_, s)| s.ranks.contains(&0))
            .map(|(n, _)| *n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(generation: u64, leader: bool, ranks: &[u32]) -> NodeStatus {
        NodeStatus {
            generation,
            leader,
            ranks: ranks.to_vec(),
        }
    }

    #[test]
    fn roles_table() {
        /// (case, the answers, the roles they give)
        type Row = (&'static str, Vec<(usize, NodeStatus)>, Roles);
        let table: Vec<Row> = vec![
            ("nobody answered", vec![], Roles::default()),
            (
                "one generation",
                vec![
                    (0, st(3, false, &[1])),
                    (2, st(3, true, &[0])),
                    (1, st(3, false, &[2])),
                ],
                Roles {
                    leader: Some(2),
                    rank0: Some(2),
                },
            ),
            (
                "a stale leader in an older generation is ignored",
                vec![
                    (0, st(2, true, &[0])),
                    (1, st(4, true, &[1])),
                    (2, st(4, false, &[0])),
                ],
                Roles {
                    leader: Some(1),
                    rank0: Some(2),
                },
            ),
            (
                "the leader did not answer (hung): no leader, rank 0 found",
                vec![(1, st(5, false, &[0])), (2, st(5, false, &[1]))],
                Roles {
                    leader: None,
                    rank0: Some(1),
                },
            ),
            (
                "a joiner with no ranks yet",
                vec![(0, st(0, false, &[])), (1, st(0, false, &[]))],
                Roles {
                    leader: None,
                    rank0: None,
                },
            ),
        ];
        for (name, answers, want) in table {
            assert_eq!(pick_roles(&answers), want, "{name}");
        }
    }
}
