/*
 * mro_clientid: a Mosquitto 2.0 plugin (plugin API 5) that binds the box's reserved client ids
 * to their broker users.
 *
 * Mosquitto 2.0 lets any authenticated user connect with any client id, and a CONNECT with an
 * id already in use ends the session holding it: any device could kick ingest off the broker.
 * This plugin's MOSQ_EVT_BASIC_AUTH callback runs before the password file is checked and
 * before Mosquitto looks for an existing session with the same id, so a refusal here (CONNACK
 * "not authorised") leaves the session holding the id untouched.
 *
 * Rules, the same as the embedded broker's (services/broker/credentials.py, owns_client_id):
 *   - an id not starting with the reserved prefix ("mro-") is not this plugin's business: defer,
 *     the password file authenticates the user as before;
 *   - an id starting with it is refused unless the user is a service user (a `service` line);
 *   - an id equal to a `client` line's id, or starting with it followed by '-' (the services add
 *     a tag), is refused unless the user is that line's owner; the longest such line decides;
 *   - otherwise (a service's ad hoc id, e.g. the operator's commands) defer.
 * The plugin never says yes: a defer still needs the right password.
 *
 * The owner file (plugin_opt_clientids), written by services/broker/credentials.py beside the
 * password file and the ACL:
 *     service mro-ingest
 *     client mro-HGR1-ingest mro-ingest
 * It is re-read when its inode, size or mtime changed (one stat per CONNECT with a reserved id)
 * and on every reload (SIGHUP). A missing or malformed file fails closed: every reserved id is
 * refused, and the reason is logged, until a good file is in place.
 *
 * Options: plugin_opt_clientids (required, path of the owner file), plugin_opt_prefix (default
 * "mro-").
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define LINE_MAX_LEN 512

struct owner {
	char *client_id; /* a client id, or the start of tagged ids */
	char *user;      /* its owner */
};

struct table {
	char **services; /* service users */
	size_t n_services;
	struct owner *owners;
	size_t n_owners;
	bool valid;      /* false: the file is missing or malformed, every reserved id is refused */
};

struct state {
	mosquitto_plugin_id_t *id;
	char *path;
	char *prefix;
	struct table table;
	bool have_sig;
	dev_t dev;
	ino_t ino;
	off_t size;
	struct timespec mtime;
};

static struct state g_state;

static void table_free(struct table *t)
{
	size_t i;
	for(i = 0; i < t->n_services; i++) free(t->services[i]);
	for(i = 0; i < t->n_owners; i++){
		free(t->owners[i].client_id);
		free(t->owners[i].user);
	}
	free(t->services);
	free(t->owners);
	memset(t, 0, sizeof(*t));
}

static bool push_service(struct table *t, const char *user)
{
	char **grown = realloc(t->services, (t->n_services + 1) * sizeof(*grown));
	if(!grown) return false;
	t->services = grown;
	t->services[t->n_services] = strdup(user);
	if(!t->services[t->n_services]) return false;
	t->n_services++;
	return true;
}

static bool push_owner(struct table *t, const char *client_id, const char *user)
{
	struct owner *grown = realloc(t->owners, (t->n_owners + 1) * sizeof(*grown));
	if(!grown) return false;
	t->owners = grown;
	t->owners[t->n_owners].client_id = strdup(client_id);
	t->owners[t->n_owners].user = strdup(user);
	t->n_owners++;
	return t->owners[t->n_owners - 1].client_id && t->owners[t->n_owners - 1].user;
}

/* Parse the owner file into `t`; false (with the reason logged) on any error. */
static bool table_load(struct table *t, const char *path)
{
	FILE *f;
	char line[LINE_MAX_LEN];
	int number = 0;
	bool ok = true;

	memset(t, 0, sizeof(*t));
	f = fopen(path, "r");
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_ERR, "mro_clientid: cannot read %s (%s): refusing every reserved client id",
				path, strerror(errno));
		return false;
	}
	while(ok && fgets(line, sizeof(line), f)){
		char *words[4] = {NULL, NULL, NULL, NULL};
		int n = 0;
		char *save = NULL;
		char *word;

		number++;
		if(!strchr(line, '\n') && !feof(f)){
			mosquitto_log_printf(MOSQ_LOG_ERR, "mro_clientid: %s:%d: line too long", path, number);
			ok = false;
			break;
		}
		for(word = strtok_r(line, " \t\r\n", &save); word && n < 4; word = strtok_r(NULL, " \t\r\n", &save)){
			words[n++] = word;
		}
		if(n == 0 || words[0][0] == '#') continue;
		if(!strcmp(words[0], "service") && n == 2){
			ok = push_service(t, words[1]);
		}else if(!strcmp(words[0], "client") && n == 3){
			ok = push_owner(t, words[1], words[2]);
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR, "mro_clientid: %s:%d: expected `service <user>` or "
					"`client <client id> <user>`", path, number);
			ok = false;
		}
	}
	if(ok && ferror(f)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "mro_clientid: error reading %s", path);
		ok = false;
	}
	fclose(f);
	if(!ok){
		table_free(t);
		mosquitto_log_printf(MOSQ_LOG_ERR, "mro_clientid: %s rejected: refusing every reserved client id", path);
		return false;
	}
	t->valid = true;
	mosquitto_log_printf(MOSQ_LOG_INFO, "mro_clientid: %s: %zu service users, %zu client ids",
			path, t->n_services, t->n_owners);
	return true;
}

/* Re-read the owner file if `force` or if it was replaced or changed since the last read. */
static void refresh(struct state *s, bool force)
{
	struct stat st;
	struct table fresh;

	if(stat(s->path, &st) != 0){
		if(s->have_sig || force || s->table.valid){
			mosquitto_log_printf(MOSQ_LOG_ERR, "mro_clientid: cannot stat %s (%s): refusing every reserved client id",
					s->path, strerror(errno));
		}
		table_free(&s->table);
		s->have_sig = false;
		return;
	}
	if(!force && s->have_sig && st.st_dev == s->dev && st.st_ino == s->ino && st.st_size == s->size
			&& st.st_mtim.tv_sec == s->mtime.tv_sec && st.st_mtim.tv_nsec == s->mtime.tv_nsec){
		return;
	}
	table_load(&fresh, s->path);
	table_free(&s->table);
	s->table = fresh;
	s->have_sig = true;
	s->dev = st.st_dev;
	s->ino = st.st_ino;
	s->size = st.st_size;
	s->mtime = st.st_mtim;
}

static bool is_service(const struct table *t, const char *user)
{
	size_t i;
	for(i = 0; i < t->n_services; i++){
		if(!strcmp(t->services[i], user)) return true;
	}
	return false;
}

/* The owner of `client_id`: the longest `client` line equal to it or followed by '-' in it. */
static const char *owner_of(const struct table *t, const char *client_id)
{
	size_t i, best_len = 0;
	const char *best = NULL;
	for(i = 0; i < t->n_owners; i++){
		size_t len = strlen(t->owners[i].client_id);
		if(strncmp(client_id, t->owners[i].client_id, len) != 0) continue;
		if(client_id[len] != '\0' && client_id[len] != '-') continue;
		if(len > best_len){
			best_len = len;
			best = t->owners[i].user;
		}
	}
	return best;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	struct state *s = userdata;
	const char *client_id = mosquitto_client_id(ed->client);
	const char *user = ed->username;
	const char *owner;
	(void)event;

	if(!client_id || strncmp(client_id, s->prefix, strlen(s->prefix)) != 0){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	refresh(s, false);
	if(!s->table.valid || !user || !is_service(&s->table, user)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "mro_clientid: refused client id %s to user %s: "
				"ids starting with %s belong to the box's services", client_id, user ? user : "(none)", s->prefix);
		return MOSQ_ERR_AUTH;
	}
	owner = owner_of(&s->table, client_id);
	if(owner && strcmp(owner, user) != 0){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "mro_clientid: refused client id %s to user %s: it belongs to %s",
				client_id, user, owner);
		return MOSQ_ERR_AUTH;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	refresh(userdata, true);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options, int option_count)
{
	int i, rc;
	struct state *s = &g_state;

	memset(s, 0, sizeof(*s));
	s->id = identifier;
	for(i = 0; i < option_count; i++){
		if(!strcmp(options[i].key, "clientids")){
			free(s->path);
			s->path = strdup(options[i].value);
		}else if(!strcmp(options[i].key, "prefix")){
			free(s->prefix);
			s->prefix = strdup(options[i].value);
		}
	}
	if(!s->path || !s->path[0]){
		mosquitto_log_printf(MOSQ_LOG_ERR, "mro_clientid: plugin_opt_clientids (the owner file) is required");
		return MOSQ_ERR_INVAL;
	}
	if(!s->prefix) s->prefix = strdup("mro-");
	if(!s->path || !s->prefix || !s->prefix[0]) return MOSQ_ERR_NOMEM;
	refresh(s, true);
	*userdata = s;
	rc = mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, s);
	if(rc == MOSQ_ERR_SUCCESS){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_reload, NULL, s);
	}
	return rc;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct state *s = userdata;
	(void)options;
	(void)option_count;
	if(s){
		mosquitto_callback_unregister(s->id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
		mosquitto_callback_unregister(s->id, MOSQ_EVT_RELOAD, on_reload, NULL);
		table_free(&s->table);
		free(s->path);
		free(s->prefix);
		s->path = s->prefix = NULL;
	}
	return MOSQ_ERR_SUCCESS;
}
