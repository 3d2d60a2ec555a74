-- pochta mail store, schema version 1 (PostgreSQL). Same tables and numbering as sqlite/0001_init.sql.
-- Runs with search_path set to the store's schema (URL option ?schema=NAME, default public).

CREATE TABLE domains (
    name        text PRIMARY KEY,
    created_at  timestamptz NOT NULL
);

CREATE TABLE users (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    address           text NOT NULL UNIQUE,
    domain            text NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    password_hash     text NOT NULL DEFAULT '',
    scram_salt        bytea,
    scram_iterations  integer,
    scram_stored_key  bytea,
    scram_server_key  bytea,
    created_at        timestamptz NOT NULL
);
CREATE INDEX users_domain ON users(domain);

CREATE TABLE aliases (
    alias    text PRIMARY KEY,
    domain   text NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    user_id  bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE
);
CREATE INDEX aliases_domain ON aliases(domain);
CREATE INDEX aliases_user ON aliases(user_id);

-- RFC 3501 §2.3.1.1 UIDVALIDITY/UIDNEXT, RFC 7162 HIGHESTMODSEQ
CREATE TABLE mailboxes (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id        bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name           text NOT NULL,
    uidvalidity    bigint NOT NULL,
    uidnext        bigint NOT NULL DEFAULT 1,
    highestmodseq  bigint NOT NULL DEFAULT 1,
    UNIQUE (user_id, name)
);

-- one row per letter, shared by every mailbox copy and the queue entry
CREATE TABLE bodies (
    id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    raw   bytea NOT NULL,
    size  bigint NOT NULL
);

CREATE TABLE messages (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mailbox_id   bigint NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid          bigint NOT NULL,
    body_id      bigint NOT NULL REFERENCES bodies(id),
    return_path  text,
    flags        text NOT NULL DEFAULT '',
    modseq       bigint NOT NULL,
    received_at  timestamptz NOT NULL,
    from_        text NOT NULL DEFAULT '',
    to_          text NOT NULL DEFAULT '',
    subject      text NOT NULL DEFAULT '',
    date         text NOT NULL DEFAULT '',
    message_id   text NOT NULL DEFAULT '',
    UNIQUE (mailbox_id, uid)
);
CREATE INDEX messages_body ON messages(body_id);

CREATE TABLE queue (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body_id     bigint NOT NULL REFERENCES bodies(id),
    sender      text NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX queue_body ON queue(body_id);

CREATE TABLE queue_rcpts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue_id      bigint NOT NULL REFERENCES queue(id) ON DELETE CASCADE,
    address       text NOT NULL,
    domain        text NOT NULL,
    state         text NOT NULL DEFAULT 'queued'
                  CHECK (state IN ('queued', 'delivered', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    next_attempt  timestamptz,
    last_reply    text NOT NULL DEFAULT '',
    held          boolean NOT NULL DEFAULT false,
    warned        boolean NOT NULL DEFAULT false,
    give_up       boolean NOT NULL DEFAULT false,
    lease_owner   text,
    lease_until   timestamptz
);
CREATE INDEX queue_rcpts_claim ON queue_rcpts(state, held, next_attempt);
CREATE INDEX queue_rcpts_queue ON queue_rcpts(queue_id);
CREATE INDEX queue_rcpts_domain ON queue_rcpts(domain, state);

CREATE TABLE relay_domains (
    domain  text PRIMARY KEY,
    owner   text NOT NULL REFERENCES users(address) ON DELETE CASCADE
);
CREATE INDEX relay_domains_owner ON relay_domains(owner);

-- a body goes when its last reference (mailbox copy or queue entry) goes
CREATE FUNCTION body_gc() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM bodies WHERE id = OLD.body_id
        AND NOT EXISTS (SELECT 1 FROM messages WHERE body_id = OLD.body_id)
        AND NOT EXISTS (SELECT 1 FROM queue WHERE body_id = OLD.body_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_body_gc AFTER DELETE ON messages
    FOR EACH ROW EXECUTE FUNCTION body_gc();
CREATE TRIGGER queue_body_gc AFTER DELETE ON queue
    FOR EACH ROW EXECUTE FUNCTION body_gc();
