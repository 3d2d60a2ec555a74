-- pochta mail store, schema version 1 (SQLite). Same tables and numbering as postgres/0001_init.sql.
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC); booleans are 0/1.
-- AUTOINCREMENT keeps ids of deleted rows from being handed out again.

CREATE TABLE domains (
    name        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL
);

CREATE TABLE users (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    address           TEXT NOT NULL UNIQUE,
    domain            TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    password_hash     TEXT NOT NULL DEFAULT '',
    scram_salt        BLOB,
    scram_iterations  INTEGER,
    scram_stored_key  BLOB,
    scram_server_key  BLOB,
    created_at        INTEGER NOT NULL
);
CREATE INDEX users_domain ON users(domain);

CREATE TABLE aliases (
    alias    TEXT PRIMARY KEY,
    domain   TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    user_id  INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE
);
CREATE INDEX aliases_domain ON aliases(domain);
CREATE INDEX aliases_user ON aliases(user_id);

-- RFC 3501 §2.3.1.1 UIDVALIDITY/UIDNEXT, RFC 7162 HIGHESTMODSEQ
CREATE TABLE mailboxes (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id        INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    uidvalidity    INTEGER NOT NULL,
    uidnext        INTEGER NOT NULL DEFAULT 1,
    highestmodseq  INTEGER NOT NULL DEFAULT 1,
    UNIQUE (user_id, name)
);

-- one row per letter, shared by every mailbox copy and the queue entry
-- raw is the LAST column: SQLite then stores zeroblob(N) without building it in memory, and
-- the body is written in place with incremental blob I/O (a large letter costs its size once).
CREATE TABLE bodies (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    size  INTEGER NOT NULL,
    raw   BLOB NOT NULL
);

CREATE TABLE messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox_id   INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid          INTEGER NOT NULL,
    body_id      INTEGER NOT NULL REFERENCES bodies(id),
    return_path  TEXT,
    flags        TEXT NOT NULL DEFAULT '',
    modseq       INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,
    from_        TEXT NOT NULL DEFAULT '',
    to_          TEXT NOT NULL DEFAULT '',
    subject      TEXT NOT NULL DEFAULT '',
    date         TEXT NOT NULL DEFAULT '',
    message_id   TEXT NOT NULL DEFAULT '',
    UNIQUE (mailbox_id, uid)
);
CREATE INDEX messages_body ON messages(body_id);

CREATE TABLE queue (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    body_id     INTEGER NOT NULL REFERENCES bodies(id),
    sender      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX queue_body ON queue(body_id);

CREATE TABLE queue_rcpts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id      INTEGER NOT NULL REFERENCES queue(id) ON DELETE CASCADE,
    address       TEXT NOT NULL,
    domain        TEXT NOT NULL,
    state         TEXT NOT NULL DEFAULT 'queued'
                  CHECK (state IN ('queued', 'delivered', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  INTEGER,
    last_reply    TEXT NOT NULL DEFAULT '',
    held          INTEGER NOT NULL DEFAULT 0,
    warned        INTEGER NOT NULL DEFAULT 0,
    give_up       INTEGER NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    lease_until   INTEGER
);
CREATE INDEX queue_rcpts_claim ON queue_rcpts(state, held, next_attempt);
CREATE INDEX queue_rcpts_queue ON queue_rcpts(queue_id);
CREATE INDEX queue_rcpts_domain ON queue_rcpts(domain, state);

CREATE TABLE relay_domains (
    domain  TEXT PRIMARY KEY,
    owner   TEXT NOT NULL REFERENCES users(address) ON DELETE CASCADE
);
CREATE INDEX relay_domains_owner ON relay_domains(owner);

-- a body goes when its last reference (mailbox copy or queue entry) goes
CREATE TRIGGER messages_body_gc AFTER DELETE ON messages
BEGIN
    DELETE FROM bodies WHERE id = OLD.body_id
        AND NOT EXISTS (SELECT 1 FROM messages WHERE body_id = OLD.body_id)
        AND NOT EXISTS (SELECT 1 FROM queue WHERE body_id = OLD.body_id);
END;

CREATE TRIGGER queue_body_gc AFTER DELETE ON queue
BEGIN
    DELETE FROM bodies WHERE id = OLD.body_id
        AND NOT EXISTS (SELECT 1 FROM messages WHERE body_id = OLD.body_id)
        AND NOT EXISTS (SELECT 1 FROM queue WHERE body_id = OLD.body_id);
END;
